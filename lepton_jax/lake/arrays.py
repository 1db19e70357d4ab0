"""Zarr v3 arrays on TensorStore with the ``sharding_indexed`` codec.

Each array's first axis indexes examples; shards group many examples into one file. Two layouts of the inner chunks
(``compression``, chosen per array when it is written; readers tell them apart by the array's ``zarr.json``):

- ``"none"`` (the default): inner chunks of about 64 KiB (:data:`RAW_CHUNK_BYTES`, K examples, K dividing the shard),
  stored uncompressed (codecs ``bytes`` + ``crc32c``), so example ``i`` of a chunk is a fixed byte slice of the shard
  file: :mod:`lepton_jax.lake.rawshards` serves a random batch from a local shard with one numpy gather, and
  TensorStore (object stores, slices) reads and checks whole chunks. Fast to write and to read at random.
- ``"zstd"``: one example per inner chunk, zstd-compressed (``bytes`` + ``zstd`` + ``crc32c``): smaller on disk for
  compressible data, but every random read is a TensorStore chunk decode (about 10 us each). Tables written before
  the raw layout existed use this layout and read as before.

In the zstd layout, tiny examples (labels, a few features: at most :data:`SMALL_EXAMPLE_BYTES`) share chunks of
about 4 KiB. The shard index carries a crc32c in both layouts, and so does every inner chunk, so
TensorStore and zarr-python detect flipped bytes on read. Any zarr v3 reader can open the arrays.

Shard files are named by zarr v3's default chunk key encoding with the ``"."`` separator (``c.3.0.0.0``): all of an
array's files sit in its one directory, so creating an array makes (and fsyncs) one directory; arrays written before
used ``"/"`` (``c/3/0/0/0``, a directory per axis), which every reader still reads.

Arrays live at a key of a lake's :class:`~lepton_jax.lake.storage.Storage` and are read and written through
TensorStore's kvstore driver for it (``file``, ``s3`` or ``gcs``). Every file of an array (``zarr.json`` and each
shard) is made durable after writing (fsync on a local disk; an object-store PUT is durable when it returns) and its
sha256 and size are recorded in the commit record, so a reader can check cheaply (size) that no shard is missing or
truncated and ``verify`` can check every byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from lepton_jax.errors import LakeError
from lepton_jax.lake.storage import Storage

TARGET_SHARD_BYTES = 64 * 2**20
READ_PARTS = 4  # concurrent TensorStore requests per batched random read
WRITE_SHARDS_IN_FLIGHT = 4  # shard writes encoded concurrently (bounded: each holds a shard's worth of memory)
READ_CACHE_BYTES = 64 * 2**20  # holds shard indices (and recently read chunks) so a random read is one byte range


SMALL_EXAMPLE_BYTES = 64  # zstd layout: examples this small (labels, a few features) share chunks of about 4 KiB
RAW_CHUNK_BYTES = 64 * 2**10  # inner chunk size of the uncompressed layout
COMPRESSIONS = ("none", "zstd")
DEFAULT_COMPRESSION = "none"

CHUNK_KEY_SEPARATOR = "."  # new arrays' chunk key encoding (module doc)

MISSING_CHUNK = 2**64 - 1  # a shard index entry's offset and size for an inner chunk not stored

_TENSORSTORE_PID: int | None = None  # the process that ran this package's first TensorStore operation


def tensorstore_guard() -> None:
    """Called before this package's TensorStore operations. TensorStore aborts a process forked from one that has
    run TensorStore operations (SIGABRT, "fork() use detected"); in such a child this raises a LakeError instead,
    which says how to start worker processes. Forks from processes that never ran them (a fork server, a parent that
    only imported lepton_jax) are fine."""
    global _TENSORSTORE_PID
    pid = os.getpid()
    if _TENSORSTORE_PID is None:
        _TENSORSTORE_PID = pid
    elif pid != _TENSORSTORE_PID:
        raise LakeError(f"process {pid} was forked from process {_TENSORSTORE_PID} after that process had read or "
                        "written the lake, and TensorStore cannot run in such a child (it aborts it); start worker "
                        "processes with the 'spawn' or 'forkserver' method (multiprocessing.get_context('spawn')), "
                        "or fork them before the parent touches the lake")


def _example_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return max(1, int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize)


def check_compression(compression: str) -> str:
    """``compression`` if it names a layout (:data:`COMPRESSIONS`), else a LakeError listing them."""
    if compression not in COMPRESSIONS:
        raise LakeError(f"unknown lake compression {compression!r}; expected one of {', '.join(COMPRESSIONS)}")
    return compression


def shard_layout(shape: tuple[int, ...], dtype: np.dtype, target_shard_bytes: int = TARGET_SHARD_BYTES,
                 compression: str = DEFAULT_COMPRESSION) -> tuple[int, int]:
    """``(examples per shard, examples per inner chunk)`` for a new array; the chunk count divides the shard.

    ``"none"``: K examples per chunk (about :data:`RAW_CHUNK_BYTES`), shards a multiple of K (a one-shard array's
    shard may run past its end). ``"zstd"``: one example per chunk; tiny examples share chunks of about 4 KiB."""
    check_compression(compression)
    n, example_bytes = int(shape[0]), _example_bytes(shape, dtype)
    cap = max(1, int(target_shard_bytes) // example_bytes)
    if compression == "zstd":
        per_shard = int(max(1, min(n, cap)))
        if example_bytes > SMALL_EXAMPLE_BYTES:
            return per_shard, 1
        per = max(1, min(per_shard, 4096 // example_bytes))
        while per_shard % per:
            per -= 1
        return per_shard, per
    per_chunk = max(1, min(RAW_CHUNK_BYTES // example_bytes, cap, n))
    per_shard = min(cap // per_chunk, -(-n // per_chunk)) * per_chunk
    return per_shard, per_chunk


def examples_per_shard(shape: tuple[int, ...], dtype: np.dtype, target_shard_bytes: int = TARGET_SHARD_BYTES,
                       compression: str = DEFAULT_COMPRESSION) -> int:
    """How many examples one shard of a new array holds (see :func:`shard_layout`)."""
    return shard_layout(shape, dtype, target_shard_bytes, compression)[0]


def zarr3_spec(kvstore: dict[str, Any], shape: tuple[int, ...], dtype: np.dtype,
               target_shard_bytes: int = TARGET_SHARD_BYTES, compression: str = DEFAULT_COMPRESSION) -> dict:
    """The TensorStore spec for a new sharded, checksummed zarr v3 array in ``kvstore`` (layouts: module doc)."""
    example_shape = list(shape[1:])
    per_shard, per_chunk = shard_layout(shape, dtype, target_shard_bytes, compression)
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": 3}})
    codecs.append({"name": "crc32c"})
    return {
        "driver": "zarr3",
        "kvstore": kvstore,
        "store_data_equal_to_fill_value": True,  # every shard file exists, so a missing one is always an error
        "metadata": {
            "shape": list(shape),
            "data_type": np.dtype(dtype).name,
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": CHUNK_KEY_SEPARATOR}},
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [per_shard, *example_shape]}},
            "codecs": [{
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [per_chunk, *example_shape],
                    "codecs": codecs,
                    "index_codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "crc32c"},
                    ],
                    "index_location": "end",
                },
            }],
        },
    }


def layout(storage: Storage, key: str) -> str:
    """The inner-chunk layout (``"none"`` or ``"zstd"``) of the array at ``key``, from its ``zarr.json``."""
    try:
        meta = json.loads(storage.read(f"{key}/zarr.json"))
        codecs = meta["codecs"][0]["configuration"]["codecs"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise LakeError(f"cannot read the layout of lake array {storage.describe(key)}: {e}") from e
    names = [c if isinstance(c, str) else c.get("name") for c in codecs]  # zarr v3 allows a codec's bare name
    return "zstd" if "zstd" in names else "none"


def content_digest(array: np.ndarray) -> str:
    """sha256 over dtype, shape and the C-order bytes: equal digests mean equal arrays."""
    h = hashlib.sha256(f"{np.dtype(array.dtype).str}{tuple(array.shape)}".encode())
    h.update(np.ascontiguousarray(array))  # the buffer itself: no copy
    return h.hexdigest()


def _create(storage: Storage, key: str, shape: tuple[int, ...], dtype: np.dtype,
            target_shard_bytes: int, compression: str) -> ts.TensorStore:
    return _created(storage, key, _start_create(storage, key, shape, dtype, target_shard_bytes, compression))


def _start_create(storage: Storage, key: str, shape: tuple[int, ...], dtype: np.dtype,
                  target_shard_bytes: int, compression: str) -> ts.Future:
    """Starts creating a new array at ``key`` (refused if anything is there); :func:`_created` awaits it."""
    if storage.tree(key) is not None:
        raise LakeError(f"refusing to overwrite existing array {storage.describe(key)}; lake arrays are written once")
    tensorstore_guard()
    try:
        spec = zarr3_spec(storage.kvstore(key), shape, dtype, target_shard_bytes, compression)
        # TensorStore does not fsync each file (and its directory) as it writes it: the writer syncs the array's
        # whole tree once when it is complete (PendingWrite.finish, ArrayWriter.close), before any record names it
        return ts.open(spec, create=True, context=ts.Context({"file_io_sync": False}))
    except ValueError as e:
        raise LakeError(f"cannot create lake array {storage.describe(key)}: {_short(e)}") from e


def _created(storage: Storage, key: str, opening: ts.Future) -> ts.TensorStore:
    try:
        return opening.result()
    except ValueError as e:
        raise LakeError(f"cannot create lake array {storage.describe(key)}: {_short(e)}") from e


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + "..." if len(text) > 300 else text


def write_array(storage: Storage, key: str, array: np.ndarray, *, target_shard_bytes: int = TARGET_SHARD_BYTES,
                after_shard: Callable[[int], None] | None = None, compression: str = DEFAULT_COMPRESSION) -> str:
    """Writes a new array at ``key`` (which must not exist) shard by shard, makes its files durable, returns its
    content digest. ``after_shard(i)`` is called after shard ``i`` is written (a hook for fault-injection tests);
    ``compression`` picks the layout (module doc).
    """
    write = start_write(storage, key, array, target_shard_bytes=target_shard_bytes, after_shard=after_shard,
                        compression=compression)
    # hashed while TensorStore encodes and writes the shards still in flight (sha256 releases the GIL)
    return write.finish(content_digest(array))


@dataclasses.dataclass
class PendingWrite:
    """An array whose last shards TensorStore may still be encoding and writing (see :func:`start_write`)."""

    storage: Storage
    key: str
    array: np.ndarray
    pending: list[ts.WriteFutures]

    def finish(self, digest: str | None = None) -> str:
        """Waits for the shards, makes the array's files durable and returns its content digest (``digest`` if
        the caller computed it meanwhile)."""
        try:
            for future in self.pending:
                future.result()
        except ValueError as e:
            raise LakeError(f"cannot write lake array {self.storage.describe(self.key)}: {_short(e)}") from e
        self.pending = []
        # its files and the directories inside it; the commit syncs its whole directory up to the root before it
        # publishes (Lake.publish), so the entries above are made durable once per commit, not once per array
        self.storage.sync(self.key, up=False)
        return content_digest(self.array) if digest is None else digest

    def abandon(self) -> None:
        """Waits for the shards in flight, ignoring their errors (so that nothing still writes once the caller
        gives up, e.g. to discard the commit)."""
        for future in self.pending:
            with contextlib.suppress(ValueError):
                future.result()
        self.pending = []


def start_write(storage: Storage, key: str, array: np.ndarray, *, target_shard_bytes: int = TARGET_SHARD_BYTES,
                after_shard: Callable[[int], None] | None = None,
                compression: str = DEFAULT_COMPRESSION) -> PendingWrite:
    """Creates the array at ``key`` and starts writing it shard by shard (at most :data:`WRITE_SHARDS_IN_FLIGHT`
    in flight: it returns while the last of them are encoded on TensorStore's threads, so the caller can work
    meanwhile); :meth:`PendingWrite.finish` completes it. ``after_shard``: as for :func:`write_array`."""
    return start_writes(storage, {key: array}, target_shard_bytes=target_shard_bytes, after_shard=after_shard,
                        compression=compression)[key]


def start_writes(storage: Storage, named: dict[str, np.ndarray], *, target_shard_bytes: int = TARGET_SHARD_BYTES,
                 after_shard: Callable[[int], None] | None = None,
                 compression: str = DEFAULT_COMPRESSION) -> dict[str, PendingWrite]:
    """:func:`start_write` for several arrays (key -> array): all are created first, together (their metadata
    written concurrently), and only then are their shards written, so no array's creation waits behind another's
    shards on TensorStore's I/O threads. On an error nothing is left writing."""
    for key, array in named.items():
        if array.ndim == 0 or array.shape[0] == 0:
            raise LakeError(f"cannot store an empty array at {storage.describe(key)}: shape {array.shape}")
    opening: dict[str, ts.Future] = {}
    try:
        for key, array in named.items():
            opening[key] = _start_create(storage, key, array.shape, array.dtype, target_shard_bytes, compression)
        stores = {key: _created(storage, key, future) for key, future in opening.items()}
    except BaseException:
        for future in opening.values():
            with contextlib.suppress(ValueError, LakeError):
                future.result()
        raise
    writes: dict[str, PendingWrite] = {}
    try:
        for key, array in named.items():
            writes[key] = _start_shards(storage, key, stores[key], array, target_shard_bytes, compression,
                                        after_shard)
    except BaseException:
        for write in writes.values():
            write.abandon()
        raise
    return writes


def _start_shards(storage: Storage, key: str, store: ts.TensorStore, array: np.ndarray, target_shard_bytes: int,
                  compression: str, after_shard: Callable[[int], None] | None) -> PendingWrite:
    per_shard = examples_per_shard(array.shape, array.dtype, target_shard_bytes, compression)
    pending = []
    try:
        for i, start in enumerate(range(0, array.shape[0], per_shard)):
            stop = min(start + per_shard, array.shape[0])
            pending.append(store[start:stop].write(array[start:stop]))
            if after_shard is not None:  # the fault-injection hook needs shard i complete
                pending.pop().result()
                after_shard(i)
            elif len(pending) >= WRITE_SHARDS_IN_FLIGHT:  # shards in flight are encoded concurrently
                pending.pop(0).result()
    except BaseException as e:  # nothing may still write into the array once this raises
        for future in pending:
            with contextlib.suppress(ValueError):
                future.result()
        if isinstance(e, ValueError):
            raise LakeError(f"cannot write lake array {storage.describe(key)}: {_short(e)}") from e
        raise
    return PendingWrite(storage, key, array, pending)


def file_digests(storage: Storage, key: str) -> dict[str, dict[str, int | str]]:
    """``{relative path: {"bytes": size, ...}}`` for every file of the array at ``key`` (``zarr.json`` and each shard
    file, :func:`shard_file`), in sorted order, from one listing; on a local lake ``zarr.json`` also gets its sha256. A
    shard file is not read back to be hashed (that would read every byte just written): its bytes are covered by
    the crc32c of its index and of every inner chunk, checked by every read and, file by file, by ``verify``
    (:func:`shard_file_problem`)."""
    listed = sorted(storage.list_recursive(key).items())
    local = storage.local_path(key) is not None
    return {rel: {"bytes": size, **({"sha256": storage.sha256(f"{key}/{rel}")} if local and rel == "zarr.json"
                                   else {})}
            for rel, (size, _) in listed}


def shard_file_problem(data: bytes, metadata: dict[str, Any]) -> str | None:
    """What is wrong with one shard file's bytes by its own checksums (the crc32c of its index, then of every
    inner chunk the index lists), for an array whose ``zarr.json`` is ``metadata``; None if it is intact."""
    import google_crc32c

    shard = metadata["chunk_grid"]["configuration"]["chunk_shape"]
    sharding = next(c for c in metadata["codecs"] if c["name"] == "sharding_indexed")["configuration"]
    chunks = int(np.prod([-(-int(s) // int(i)) for s, i in zip(shard, sharding["chunk_shape"], strict=True)]))
    index_bytes = 16 * chunks + 4
    if len(data) < index_bytes:
        return f"{len(data)} bytes: shorter than its shard index"
    index = data[-index_bytes:]
    if google_crc32c.value(index[:-4]) != int.from_bytes(index[-4:], "little"):
        return "shard index crc32c mismatch (bytes changed)"
    for k, (offset, size) in enumerate(np.frombuffer(index[:-4], "<u8").reshape(-1, 2).tolist()):
        if offset == MISSING_CHUNK and size == MISSING_CHUNK:
            continue
        chunk = data[offset:offset + size]
        if len(chunk) != size or size < 4 or google_crc32c.value(chunk[:-4]) != int.from_bytes(chunk[-4:], "little"):
            return f"inner chunk {k} crc32c mismatch (bytes changed)"
    return None


def open_array(storage: Storage, key: str, cache_bytes: int = READ_CACHE_BYTES, *,
               context: ts.Context | None = None) -> ts.TensorStore:
    """Opens an existing array for reading, turning TensorStore errors into a LakeError naming the path.

    Lake arrays are immutable, so cached data (the shard indices above all) is never re-validated against the file.
    Arrays opened with one shared ``context`` (see :func:`read_context`) share one cache pool.
    """
    spec = {"driver": "zarr3", "kvstore": storage.kvstore(key),
            "recheck_cached_data": False, "recheck_cached_metadata": False}
    if context is None:
        spec["context"] = {"cache_pool": {"total_bytes_limit": int(cache_bytes)}}
    tensorstore_guard()
    try:
        return ts.open(spec, open=True, read=True, context=context).result()
    except ValueError as e:
        raise LakeError(f"cannot open lake array {storage.describe(key)}: {_short(e)}; "
                        "run `lepton-jax lake verify` or re-ingest") from e


def read_context(cache_bytes: int = READ_CACHE_BYTES) -> ts.Context:
    """One TensorStore context (cache pool of ``cache_bytes``) for every fragment of a split."""
    return ts.Context({"cache_pool": {"total_bytes_limit": int(cache_bytes)}})


def read_many(requests: list[tuple[ts.TensorStore, np.ndarray, str]], parts: int = READ_PARTS) -> list[np.ndarray]:
    """Reads ``store[index]`` for every ``(store, sorted index array, path)``, all requests in flight at once (each
    index split into pieces so that at least ``parts`` requests run concurrently)."""
    tensorstore_guard()
    futures = []
    per = max(1, -(-parts // max(len(requests), 1)))
    try:
        for store, index, _ in requests:
            k = per if index.size >= 2 * per else 1
            futures.append([store[piece].read() for piece in np.array_split(index, k)])
        out = []
        for fs in futures:
            out.append(np.concatenate([f.result() for f in fs]) if len(fs) > 1 else fs[0].result())
        return out
    except (ValueError, IndexError) as e:
        paths = ", ".join(sorted({p for _, _, p in requests}))
        raise LakeError(f"corrupt lake array {paths}: {e}") from e


class ArrayWriter:
    """A new array of known ``shape`` written from consecutive blocks along axis 0 (bounded memory);
    ``compression`` picks the layout (module doc)."""

    def __init__(self, storage: Storage, key: str, shape: tuple[int, ...], dtype: np.dtype, *,
                 target_shard_bytes: int = TARGET_SHARD_BYTES, compression: str = DEFAULT_COMPRESSION):
        self.storage, self.key, self.shape = storage, key, tuple(int(s) for s in shape)
        self.store = _create(storage, key, self.shape, dtype, target_shard_bytes, compression)
        self.hash = hashlib.sha256(f"{np.dtype(dtype).str}{self.shape}".encode())
        self.rows = 0

    def write(self, block: np.ndarray) -> None:
        tensorstore_guard()
        try:
            self.store[self.rows:self.rows + block.shape[0]].write(block).result()
        except ValueError as e:
            raise LakeError(f"cannot write lake array {self.storage.describe(self.key)}: {_short(e)}") from e
        self.hash.update(np.ascontiguousarray(block))
        self.rows += block.shape[0]

    def close(self) -> str:
        """Makes the array's files durable and returns its content digest."""
        if self.rows != self.shape[0]:
            raise LakeError(f"internal error: wrote {self.rows} rows of {self.shape[0]} to {self.key}")
        # its files and the directories inside it; the commit syncs its whole directory up to the root before it
        # publishes (Lake.publish), so the entries above are made durable once per commit, not once per array
        self.storage.sync(self.key, up=False)
        return self.hash.hexdigest()


def read(store: ts.TensorStore, index=slice(None), *, path: Path | str = "", parts: int = READ_PARTS) -> np.ndarray:
    """Reads ``store[index]`` into numpy; corrupt or missing chunks raise a LakeError naming the array.

    An integer index array is read as ``parts`` concurrent requests over consecutive pieces of it: one request's
    chunks are decoded one after another, so several in flight keep TensorStore's thread pools busy."""
    tensorstore_guard()
    try:
        if isinstance(index, np.ndarray) and index.ndim == 1 and parts > 1 and index.size >= 2 * parts:
            futures = [store[piece].read() for piece in np.array_split(index, parts)]
            return np.concatenate([f.result() for f in futures])
        return store[index].read().result()
    except (ValueError, IndexError) as e:
        raise LakeError(f"corrupt lake array {path or store.kvstore}: {e}") from e


def key_separator(metadata: dict[str, Any]) -> str | None:
    """The separator of a zarr v3 array's default chunk key encoding (``"/"`` or ``"."``) from its metadata; None
    for another encoding."""
    encoding = metadata.get("chunk_key_encoding", {"name": "default"})
    if isinstance(encoding, str):
        encoding = {"name": encoding}
    separator = (encoding.get("configuration") or {}).get("separator", "/")
    return separator if encoding.get("name") == "default" and separator in ("/", ".") else None


def shard_file(shard: int, rank: int, separator: str) -> str:
    """The relative path of shard file ``shard`` (along axis 0) of an array of ``rank`` axes."""
    return separator.join(["c", str(shard), *["0"] * (rank - 1)])


def is_shard_file(rel: str) -> bool:
    """Whether an array's relative file path names a shard (not ``zarr.json``)."""
    return rel.startswith(("c/", "c."))


def shard_keys(store: ts.TensorStore) -> list[str]:
    """Relative paths of the shard files an array of this shape must have."""
    per_shard = int(store.chunk_layout.write_chunk.shape[0])
    separator = key_separator(store.spec().to_json().get("metadata", {})) or "/"
    return [shard_file(i, store.rank, separator) for i in range(-(-int(store.shape[0]) // per_shard))]


def iter_blocks(store: ts.TensorStore, *, path: Path | str = "") -> Iterator[np.ndarray]:
    """The whole array as consecutive shard-sized blocks along axis 0 (bounded memory)."""
    per_shard = int(store.chunk_layout.write_chunk.shape[0])
    n = int(store.shape[0])
    for start in range(0, n, per_shard):
        yield read(store, slice(start, min(start + per_shard, n)), path=path)


def stored_content_digest(store: ts.TensorStore, *, path: Path | str = "") -> str:
    """The :func:`content_digest` of a stored array, computed block by block."""
    h = hashlib.sha256(f"{store.dtype.numpy_dtype.str}{tuple(int(n) for n in store.shape)}".encode())
    for block in iter_blocks(store, path=path):
        h.update(np.ascontiguousarray(block))
    return h.hexdigest()
