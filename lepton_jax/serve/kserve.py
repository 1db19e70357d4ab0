"""The KServe v2 (Open Inference Protocol) wire format: JSON tensors and the binary tensor extension.

Pure functions over bytes, shared by the uvicorn server and the Ray Serve deployment:

- :func:`decode_request` turns a request body (and its ``Inference-Header-Content-Length`` / ``Content-Encoding``
  headers) into :class:`Tensor` s, checking structure and types strictly: sizes are ints (a JSON ``true`` is not
  a 1), JSON nesting is bounded *before* parsing, binary chunks must add up exactly.
- :func:`encode_response` writes outputs as JSON ``data`` or, where asked (``binary_data_output`` or an output's
  ``binary_data``), as raw little-endian bytes after the JSON header, as Triton's ``tritonclient`` expects.

Every refusal is a :class:`RequestError` with an HTTP status, a metrics label and a message for the caller.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import struct
import zlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import orjson

from lepton_jax.data.transforms import out_of_range

HEADER_LENGTH = "inference-header-content-length"
JSON_HEADERS: Mapping[str, str] = MappingProxyType({"content-type": "application/json"})  # a JSON answer's headers
MAX_JSON_DEPTH = 12  # {"inputs": [{"data": [[[[...]]]]}]} needs 3 + the tensor's rank (at most MAX_RANK)
MAX_RANK = 8
NUMERIC = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "INT8": np.int8, "INT16": np.int16,
           "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
           "UINT64": np.uint64}
DATATYPES = (*NUMERIC, "BOOL", "BYTES")
_DATATYPE_SET = frozenset(DATATYPES)
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPEN, _CLOSE = np.zeros(256, np.int8), np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_CLOSE[[ord("]"), ord("}")]] = 1
_SIZE = re.compile(r"[ \t]*([0-9]{1,18})[ \t]*")  # ASCII digits only (str.isdigit() also takes "²" and "٣")


class RequestError(Exception):
    """A request the server refuses: HTTP status, error kind (a metrics label) and a message for the caller."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers

    def __reduce__(self) -> tuple[Any, ...]:  # raised in codec worker processes, re-raised in the server
        return type(self), (self.status, self.kind, self.message, self.headers)


@dataclasses.dataclass
class Tensor:
    """One input or output: ``data`` is an ndarray of ``shape`` (an object array of ``bytes`` for BYTES)."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class InferRequest:
    """A decoded request: its inputs, the outputs asked for (None: all) and which of them come back binary."""

    inputs: list[Tensor]
    id: str | None = None
    outputs: list[dict[str, Any]] | None = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)

    def binary_output(self, name: str) -> bool:
        default = self.parameters.get("binary_data_output") is True
        for spec in self.outputs or []:
            if spec["name"] == name:
                return spec.get("parameters", {}).get("binary_data", default) is True
        return default


_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def json_depth(raw: bytes) -> int:
    """An upper bound of the nesting of ``[``/``{`` in a JSON text, exact above :data:`MAX_JSON_DEPTH` (brackets
    inside strings do not count); no parsing."""
    if (brackets := raw.count(b"[") + raw.count(b"{")) <= MAX_JSON_DEPTH:  # cannot nest deeper than that
        return brackets
    text = _STRING.sub(b'""', raw) if b'"' in raw else raw
    brackets = np.frombuffer(text.translate(None, _NOT_BRACKETS), np.uint8)
    if not brackets.size:
        return 0
    return int(np.cumsum(_OPEN[brackets].astype(np.int32) - _CLOSE[brackets]).max())


def parse_size(value: str) -> int | None:
    """A byte count from a header (``Content-Length``, ``Inference-Header-Content-Length``): ASCII digits, at most
    18 of them, optionally between spaces or tabs; None when ``value`` is anything else."""
    match = _SIZE.fullmatch(value)
    return None if match is None else int(match[1])


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A request body after ``Content-Encoding`` (identity, gzip, deflate), never inflated past ``limit`` bytes."""
    out = inflate_within(body, encoding, limit)
    if out is None:
        raise RequestError(413, "too_large", f"decompressed request body exceeds the limit of {limit} bytes; send "
                                             "fewer rows per request")
    return out


_GZIP_MIN_BYTES = 18  # a gzip member's 10-byte header and 8-byte trailer (CRC32, ISIZE)


def declares_more_than(body: bytes, encoding: str | None, limit: int) -> bool:
    """Whether a gzip ``body``'s trailer declares more than ``limit`` inflated bytes: a look at its last 4 bytes
    (ISIZE, the size mod 2**32, RFC 1952; of the last member where there are several), nothing inflated. The server
    sends such a body to a codec worker without inflating any of it on the event loop; the worker inflates it,
    bounded by the body limit, so a trailer that lies costs the worker, never the event loop."""
    return ((encoding or "").strip().lower() == "gzip" and len(body) >= _GZIP_MIN_BYTES
            and int.from_bytes(body[-4:], "little") > limit)


def inflate_within(body: bytes, encoding: str | None, limit: int) -> bytes | None:
    """``body`` after ``Content-Encoding`` when that holds at most ``limit`` bytes, else None (inflating stops past
    ``limit``): the server decides from the *inflated* size whether a body is cheap enough to decode inline."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body if len(body) <= limit else None
    if encoding not in ("gzip", "deflate"):
        raise RequestError(415, "encoding", f"Content-Encoding {encoding!r} is not supported; send identity, gzip "
                                            "or deflate")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise RequestError(400, "encoding", f"request body is not valid {encoding} data: {e}") from e
    if len(out) > limit or inflater.unconsumed_tail:
        return None
    if not inflater.eof:
        raise RequestError(400, "encoding", f"request body is truncated {encoding} data")
    return out


def decode_request(body: bytes, header_length: str | None = None, *, max_elements: int) -> InferRequest:
    """A KServe v2 inference request from its body; ``header_length`` is the binary extension's header value.

    ``max_elements`` bounds the elements of any one input (checked from its shape before its data is touched).
    """
    binary = b""
    if header_length is not None:
        split = parse_size(header_length)
        if split is None or split > len(body):
            raise RequestError(400, "binary", f"Inference-Header-Content-Length {header_length!r} is not a size "
                                              f"within the {len(body)}-byte body")
        body, binary = body[:split], body[split:]
    if json_depth(body) > MAX_JSON_DEPTH:
        raise RequestError(400, "bad_json", f"request JSON is nested deeper than {MAX_JSON_DEPTH} levels; a v2 "
                                            "request needs 3 plus the tensor's rank")
    doc = _parse_json(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"] \
            or not all(isinstance(spec, dict) for spec in doc["inputs"]):
        raise RequestError(400, "bad_request", 'malformed request: expected a KServe v2 inference request {"inputs": '
                                               '[{"name": ..., "shape": [...], "datatype": ..., "data": [...]}]}')
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(400, "bad_request", f"request id must be a string, got {type(request_id).__name__}")
    parameters = _parameters(doc, "request")
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                    for o in outputs):
            raise RequestError(400, "bad_request", 'malformed request: "outputs" must be a list of {"name": ..., '
                                                   '"parameters": {...}}')
        for o in outputs:
            _parameters(o, f"output {o['name']!r}")
    offset, inputs = 0, []
    for spec in doc["inputs"]:
        tensor, offset = _decode_tensor(spec, binary, offset, max_elements)
        inputs.append(tensor)
    if offset != len(binary):
        raise RequestError(400, "binary", f"the body holds {len(binary)} bytes of binary tensor data but the inputs' "
                                          f"binary_data_size add up to {offset}")
    return InferRequest(inputs, request_id, outputs, parameters)


def _parse_json(body: bytes) -> Any:
    """orjson (UTF-8 only, as RFC 8259 asks); what it refuses is parsed again by the standard library, which also
    takes Python's ``NaN``/``Infinity`` literals (so such a request gets the finite-values error naming its rows)
    and words the error for the caller."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body.decode("utf-8"))  # json.loads(bytes) would guess UTF-16/32
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(400, "bad_json", f"request body is not valid JSON ({e}); expected a KServe v2 inference "
                                            'request {"inputs": [{"name", "shape", "datatype", "data"}]}') from e


def _parameters(doc: dict[str, Any], what: str | None = None) -> dict[str, Any]:
    params = doc.get("parameters")
    if params is None:
        return {}
    if type(params) is not dict:
        what = what or f"input {doc.get('name')!r}"
        raise RequestError(400, "bad_request", f"{what}: parameters must be a JSON object")
    return params


def _decode_tensor(spec: dict[str, Any], binary: bytes, offset: int, max_elements: int) -> tuple[Tensor, int]:
    name = spec.get("name")
    if not isinstance(name, str):
        raise RequestError(400, "bad_request", f"every input needs a string name, got {name!r}")
    datatype = spec.get("datatype")
    if datatype not in _DATATYPE_SET:
        raise RequestError(400, "datatype", f"input {name!r}: datatype {datatype!r} is not a KServe v2 datatype "
                                            f"({', '.join(DATATYPES)})")
    shape = spec.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(type(d) is int and d >= 0 for d in shape):
        raise RequestError(400, "shape", f"input {name!r}: shape {shape!r} is not a list of at most {MAX_RANK} "
                                         "non-negative integers")
    count = math.prod(shape)
    if count > max_elements:
        raise RequestError(413, "too_large", f"input {name!r}: shape {shape} holds {count} elements; this server "
                                             f"takes at most {max_elements} per request; split the request")
    params = _parameters(spec)
    size = params.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0 or offset + size > len(binary):
            raise RequestError(400, "binary", f"input {name!r}: binary_data_size {size!r} does not fit the "
                                              f"{len(binary) - offset} bytes of binary data left in the body")
        if "data" in spec:
            raise RequestError(400, "binary", f"input {name!r} has both binary_data_size and JSON data")
        data = _from_binary(name, datatype, shape, binary[offset:offset + size])
        return Tensor(name, datatype, shape, data, params), offset + size
    if "data" not in spec:
        raise RequestError(400, "bad_request", f"input {name!r} has neither data nor binary_data_size")
    return Tensor(name, datatype, shape, _from_json(name, datatype, shape, spec["data"]), params), offset


def _from_binary(name: str, datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise RequestError(400, "binary", f"input {name!r}: BYTES data ends inside a length prefix")
            (n,) = struct.unpack_from("<I", raw, pos)
            if pos + 4 + n > len(raw):
                raise RequestError(400, "binary", f"input {name!r}: a BYTES element runs past the end of its data")
            items.append(raw[pos + 4:pos + 4 + n])
            pos += 4 + n
        data = np.empty(len(items), object)
        data[:] = items
    else:
        dtype = np.dtype(np.bool_ if datatype == "BOOL" else NUMERIC[datatype]).newbyteorder("<")
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise RequestError(400, "binary", f"input {name!r}: {len(raw)} bytes of binary data but shape {shape} of "
                                              f"{datatype} needs {math.prod(shape) * dtype.itemsize}")
        data = np.frombuffer(raw, dtype)
    if data.size != math.prod(shape):
        raise RequestError(400, "shape", f"input {name!r}: {data.size} elements but shape {shape} needs "
                                         f"{math.prod(shape)}")
    return data.reshape(shape)


def _flatten(data: Any) -> tuple[list[Any], set[type]]:
    """Nested JSON lists -> one flat list (row-major) and the types of its values; the nesting depth is bounded by
    :data:`MAX_JSON_DEPTH`."""
    if not isinstance(data, list):
        return [data], {type(data)}
    flat = data
    while list in (kinds := set(map(type, flat))):
        if kinds != {list}:
            raise TypeError("mixes lists and scalars at one level")
        flat = list(itertools.chain.from_iterable(flat))
    return flat, kinds


def _from_json(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    try:
        flat, kinds = _flatten(data)
    except TypeError as e:
        raise RequestError(400, "shape", f"input {name!r}: data {e}; send a flat list or lists nested like the "
                                         "shape") from e
    if len(flat) != math.prod(shape):
        raise RequestError(400, "shape", f"input {name!r}: data has {len(flat)} values but shape {shape} needs "
                                         f"{math.prod(shape)}")
    if kinds == {float} and datatype in ("FP32", "FP64", "FP16"):  # the common case, in one conversion
        return np.array(flat, np.float64).reshape(shape)
    if datatype == "BYTES":
        if not kinds <= {str}:
            raise RequestError(400, "datatype", f"input {name!r}: BYTES data must be strings")
        out = np.empty(len(flat), object)
        out[:] = [s.encode() for s in flat]
        return out.reshape(shape)
    if datatype == "BOOL":
        if not kinds <= {bool}:
            raise RequestError(400, "datatype", f"input {name!r}: BOOL data must be true/false")
        return np.asarray(flat, np.bool_).reshape(shape)
    allowed = {int} if np.dtype(NUMERIC[datatype]).kind in "iu" else {int, float}
    if not kinds <= allowed:
        bad = sorted(k.__name__ for k in kinds - allowed)
        raise RequestError(400, "datatype", f"input {name!r}: data holds {', '.join(bad)} values, not numbers of "
                                            f"datatype {datatype}")
    try:
        values = np.asarray(flat, np.float64 if float in kinds else np.int64)
    except OverflowError as e:
        raise RequestError(400, "datatype", f"input {name!r}: an integer does not fit datatype {datatype}") from e
    return values.reshape(shape)


def encode_response(request: InferRequest | None, outputs: list[Tensor], *, model_name: str,
                    model_version: str) -> tuple[bytes, Mapping[str, str]]:
    """The response body and headers: the requested outputs (all by default), JSON or binary as asked."""
    if request is None or (request.outputs is None and request.id is None
                           and request.parameters.get("binary_data_output") is not True):  # all outputs, as JSON
        return orjson.dumps({"model_name": model_name, "model_version": model_version,
                             "outputs": [_json_entry(out) for out in outputs]},
                            option=orjson.OPT_SERIALIZE_NUMPY), JSON_HEADERS
    wanted = [o["name"] for o in request.outputs] if request and request.outputs else [o.name for o in outputs]
    by_name = {o.name: o for o in outputs}
    if unknown := [n for n in wanted if n not in by_name]:
        raise RequestError(400, "bad_request", f"unknown output(s) {unknown}; this model has {list(by_name)}")
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": []}
    if request is not None and request.id is not None:
        doc["id"] = request.id
    chunks = []
    for name in wanted:
        out = by_name[name]
        if request is not None and request.binary_output(name):
            raw = _to_binary(out)
            entry = {"name": name, "datatype": out.datatype, "shape": list(out.data.shape),
                     "parameters": {"binary_data_size": len(raw)}}
            chunks.append(raw)
        else:
            entry = _json_entry(out)
        doc["outputs"].append(entry)
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, JSON_HEADERS
    return b"".join([header, *chunks]), {"content-type": "application/octet-stream",
                                         "inference-header-content-length": str(len(header))}


def _json_entry(out: Tensor) -> dict[str, Any]:
    if out.datatype == "BYTES":
        data: Any = [b.decode() for b in out.data.reshape(-1)]
    else:  # orjson writes numpy arrays itself (FP32 as the shortest float32 repr)
        data = np.ascontiguousarray(out.data.reshape(-1))
    return {"name": out.name, "datatype": out.datatype, "shape": list(out.data.shape), "data": data}


def _to_binary(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in tensor.data.reshape(-1))
    dtype = np.dtype(np.bool_ if tensor.datatype == "BOOL" else NUMERIC[tensor.datatype]).newbyteorder("<")
    return np.ascontiguousarray(tensor.data, dtype).tobytes()


def error_body(message: str) -> bytes:
    """The KServe v2 error body ``{"error": message}``."""
    return json.dumps({"error": message}).encode()


class _Shape:
    """``[N, 8, 8, 1]`` in an error message, formatted only when one is raised."""

    def __init__(self, example_shape: tuple[int, ...]):
        self.example_shape = example_shape

    def __format__(self, spec: str) -> str:
        return f"[N, {', '.join(map(str, self.example_shape))}]"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a model takes: one input of ``example_shape`` per row, raw values in ``value_range`` — per column in
    ``column_ranges`` for a tabular table (names in ``columns``) — (picklable)."""

    model: str
    input_name: str
    example_shape: tuple[int, ...]
    value_range: tuple[float, float]
    column_ranges: tuple[tuple[float, float], ...] | None = None
    columns: tuple[str, ...] | None = None

    def rows(self, request: InferRequest, max_rows: int) -> np.ndarray:
        """The decoded request's input -> validated float32 rows ``(N, *example_shape)``."""
        want = _Shape(self.example_shape)
        if len(request.inputs) != 1 or request.inputs[0].name != self.input_name:
            names = [t.name for t in request.inputs]
            raise RequestError(400, "bad_request", f"unknown input(s) {names}; model {self.model!r} takes one "
                                                   f"input named {self.input_name!r} of shape {want}")
        tensor = request.inputs[0]
        name = tensor.name
        if tensor.datatype not in NUMERIC:
            raise RequestError(400, "datatype", f"input {name!r}: datatype {tensor.datatype!r} is not supported; "
                                                f"expected FP32 (or another numeric type: {', '.join(NUMERIC)})")
        shape, example = list(tensor.shape), list(self.example_shape)
        if shape[1:] == example[:-1] and example[-1] == 1:
            shape = [*shape, 1]
        if shape[1:] != example or not shape or shape[0] < 1:
            raise RequestError(400, "shape", f"input {name!r}: shape {tensor.shape} does not match the model; "
                                             f"expected {want} with N >= 1")
        if shape[0] > max_rows:
            raise RequestError(413, "too_large", f"input {name!r}: {shape[0]} rows exceed this server's limit of "
                                                 f"{max_rows} rows per request; split the request")
        values = tensor.data
        if self.column_ranges is None:  # fast path: NaN fails both comparisons, so finite and in range here
            rows = values.reshape(shape).astype(np.float32)
            lo, hi = self.value_range
            if rows.size and lo <= rows.min() and rows.max() <= hi:
                return rows
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            bad = int((~np.isfinite(values.reshape(shape[0], -1))).any(axis=1).sum())
            raise RequestError(400, "non_finite", f"input {name!r}: {bad} example(s) contain NaN or inf; expected "
                                                  f"finite values in {list(self.value_range)}")
        rows = values.reshape(shape).astype(np.float32)
        spec: dict[str, Any] = {"value_range": list(self.value_range)}
        if self.column_ranges is not None:
            spec["column_ranges"] = [list(c) for c in self.column_ranges]
        if self.columns is not None:
            spec["columns"] = list(self.columns)
        why = out_of_range(rows, spec)
        if why is not None:
            raise RequestError(400, "range", f"input {name!r}: {why} (raw units of the lake table)")
        return rows


def decode_rows(body: bytes, header_length: str | None, encoding: str | None, *, spec: InputSpec, body_limit: int,
                max_rows: int) -> tuple[InferRequest, np.ndarray]:
    """Body bytes -> (the request without its input data, validated rows): everything a server does before the
    model, as one picklable function so that a worker process can do it off the server's event loop and GIL."""
    body = decompress(body, encoding, body_limit)
    request = decode_request(body, header_length, max_elements=max_rows * math.prod(spec.example_shape))
    rows = spec.rows(request, max_rows)
    request.inputs = []  # the data is in rows now; do not send it back from a worker process
    return request, rows
