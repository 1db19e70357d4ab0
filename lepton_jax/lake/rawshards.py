"""Random batches from raw (uncompressed) sharded zarr v3 arrays on a local disk: one numpy gather per shard.

An array in the lake's ``"none"`` layout (:mod:`lepton_jax.lake.arrays`) stores inner chunks of K examples as their
little-endian bytes followed by a crc32c, so example ``i`` of chunk ``c`` is a fixed byte slice of the shard file.
:class:`RawArray` reads each shard's index once (the zarr v3 sharding index at the end of the file: one
``(offset, nbytes)`` uint64 pair per inner chunk and a crc32c, which is checked), maps the shard read-only and serves a
batch of indices as one numpy fancy index per shard it touches, with no per-example Python work and no decode.

Integrity: every byte this path returns is checked. :meth:`RawArray.read` with ``verify=True`` (the default) copies
each inner chunk a batch touches out of the mapping, checks its crc32c (the one the zarr v3 ``crc32c`` codec stored
after it) and gathers the rows from the checked copy; a reader that checks the rows it returns by other means (the
split reader compares them with the fragment's row checks or row hashes, see
:class:`~lepton_jax.lake.read.SplitReader`) passes ``verify=False`` and gathers straight from the mapping. So a byte
changed on disk after a process first touched a shard (mtime restored or not) is an error naming the file, not data.
Each shard's size is checked against the commit record before mapping. A shard file truncated under a reader would
fault the mapping (SIGBUS): lake code never truncates or rewrites a committed file (gc unlinks whole directories,
which leaves a mapped file readable), so only an outside writer truncating the file in place remains a risk.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import mmap
import os
import resource
import sys
import threading
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from lepton_jax.errors import LakeError
from lepton_jax.lake.arrays import key_separator, shard_file

MISSING = np.uint64(2**64 - 1)  # the sharding index's marker of a chunk that was never written
_LITTLE_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}


def _max_mapped() -> int:
    """How many shards a process keeps mapped at once. Before Python 3.13 every ``mmap`` holds a duplicate file
    descriptor, so stay well inside the open-file limit; from 3.13 ``trackfd=False`` holds none."""
    if sys.version_info >= (3, 13):
        return 16384
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        soft = 1024
    return max(16, min(16384, (soft if soft != resource.RLIM_INFINITY else 65536) // 4))


MAX_MAPPED_SHARDS = _max_mapped()
# (reader token, shard) -> the mapped shard, least recently used first: each RawArray maps its shards itself, all
# within one process-wide bound
_mapped: collections.OrderedDict[tuple[int, int], MappedShard] = collections.OrderedDict()
_tokens = itertools.count()
_mapped_lock = threading.Lock()


def groups(keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(key, positions)`` for each distinct value of the integer array ``keys``, in increasing key order, the
    positions in their original order: one stable sort, then a slice per key (no mask per key)."""
    if not keys.size:
        return []
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    cuts = (np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist()
    return [(int(ordered[a]), order[a:b]) for a, b in zip([0, *cuts], [*cuts, keys.size], strict=True)]


@dataclasses.dataclass(frozen=True)
class MappedShard:
    """One mapped shard: ``view`` (a ``(chunk, row, ...)`` array when its chunks are evenly spaced, else one array
    per chunk) over ``mapped``, and each chunk's byte offset in the file."""

    view: Any
    mapped: Any
    offsets: np.ndarray
    where: str  # the file, for messages


@dataclasses.dataclass(frozen=True)
class RawLayout:
    """What the fast path needs from a raw array's ``zarr.json``."""

    shape: tuple[int, ...]
    dtype: np.dtype
    per_shard: int
    per_chunk: int
    chunk_bytes: int  # encoded bytes of one inner chunk: its data plus the 4-byte crc32c
    separator: str = "/"  # of the chunk keys (arrays.CHUNK_KEY_SEPARATOR for new arrays)

    @property
    def example_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @property
    def index_bytes(self) -> int:
        return 16 * (self.per_shard // self.per_chunk) + 4

    def shard_key(self, shard: int) -> str:
        return shard_file(shard, len(self.shape), self.separator)


def _codec(c: Any) -> dict[str, Any]:
    return {"name": c, "configuration": {}} if isinstance(c, str) else {"configuration": {}, **c}


def raw_layout(metadata: dict[str, Any]) -> RawLayout | None:
    """The layout of a zarr v3 array's metadata if it is the lake's raw sharded layout (inner codecs exactly
    ``bytes`` little-endian + ``crc32c``, index ``bytes`` + ``crc32c`` at the end, shards and chunks whole examples
    along axis 0), else None: such arrays (the zstd layout, older tables) are read through TensorStore."""
    try:
        shape = tuple(int(n) for n in metadata["shape"])
        dtype = np.dtype(metadata["data_type"]).newbyteorder("<")
        if metadata.get("zarr_format") != 3 or dtype.kind not in "biuf" or len(shape) < 1:
            return None
        if metadata["chunk_grid"]["name"] != "regular" or len(metadata["codecs"]) != 1:
            return None
        separator = key_separator(metadata)
        if separator is None:
            return None  # shard files named otherwise than c/<i>/0/... or c.<i>.0...
        shard = [int(n) for n in metadata["chunk_grid"]["configuration"]["chunk_shape"]]
        sharding = _codec(metadata["codecs"][0])
        conf = sharding["configuration"]
        chunk = [int(n) for n in conf["chunk_shape"]]
        codecs = [_codec(c) for c in conf["codecs"]]
        index_codecs = [_codec(c) for c in conf.get("index_codecs", [])]
        if (sharding["name"] != "sharding_indexed" or conf.get("index_location", "end") != "end"
                or shard[1:] != list(shape[1:]) or chunk[1:] != list(shape[1:])
                or chunk[0] < 1 or shard[0] % chunk[0]
                or [c["name"] for c in codecs] != ["bytes", "crc32c"]
                or [c["name"] for c in index_codecs] != ["bytes", "crc32c"]
                or codecs[0]["configuration"].get("endian", "little") != "little"
                or index_codecs[0]["configuration"].get("endian", "little") != "little"):
            return None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None
    example_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    return RawLayout(shape, dtype, shard[0], chunk[0], chunk[0] * example_bytes + 4, separator)


def open_raw(path: Path, files: dict[str, dict[str, Any]], describe: str) -> RawArray | None:
    """A :class:`RawArray` for the local array directory ``path`` whose commit record lists ``files`` (relative path
    -> bytes and sha256), or None if the array is not in the raw layout."""
    try:
        metadata = json.loads((path / "zarr.json").read_bytes())
    except (OSError, ValueError) as e:
        raise LakeError(f"cannot read {describe}/zarr.json: {e}; run `lepton-jax lake verify`") from e
    layout = raw_layout(metadata)
    return None if layout is None else RawArray(path, layout, files, describe)


class RawArray:
    """Batched reads of one local raw-layout array (thread-safe; shards are mapped on first use)."""

    def __init__(self, path: Path, layout: RawLayout, files: dict[str, dict[str, Any]], describe: str):
        self.path, self.layout, self.files, self.describe = Path(path), layout, files, describe
        self._token = next(_tokens)

    def read(self, idx: np.ndarray, *, verify: bool = True) -> np.ndarray:
        """``array[idx]`` for an int64 index array within bounds (any order, duplicates allowed): one gather per
        shard touched, written straight into the result in the order asked for. With ``verify`` the rows come from
        copies of their inner chunks whose crc32c was checked (a LakeError naming the file if one differs);
        without, from the mapping (the caller checks what it returns)."""
        lay = self.layout
        if lay.per_shard >= lay.shape[0]:  # one shard
            return self._gather(self._shard(0), idx, verify)
        shard = idx // lay.per_shard
        first = int(shard[0]) if idx.size else 0
        if idx.size == 0 or not np.any(shard != first):
            return self._gather(self._shard(first), idx - first * lay.per_shard, verify)
        out = np.empty((idx.size, *lay.shape[1:]), lay.dtype)
        for s, rows in groups(shard):
            out[rows] = self._gather(self._shard(s), idx[rows] - s * lay.per_shard, verify)
        return out

    def files_of(self, idx: np.ndarray) -> list[str]:
        """The shard files (as named in messages) that hold rows ``idx``."""
        shards = np.unique(np.asarray(idx, dtype=np.int64) // self.layout.per_shard).tolist()
        return [f"{self.describe}/{self.layout.shard_key(s)}" for s in shards]

    def _gather(self, shard: MappedShard, local: np.ndarray, verify: bool) -> np.ndarray:
        k = self.layout.per_chunk
        if verify:
            return self._gather_checked(shard, local)
        view = shard.view
        if isinstance(view, np.ndarray):  # chunks evenly spaced: one (chunk, row) view of the shard
            return view[np.divmod(local, k)]
        chunk = local // k  # chunks out of order in the file: one view per chunk
        rows = [view[c][r] for c, r in zip(chunk.tolist(), (local % k).tolist(), strict=True)]
        return np.stack(rows) if rows else np.empty((0, *self.layout.shape[1:]), self.layout.dtype)

    def _gather_checked(self, shard: MappedShard, local: np.ndarray) -> np.ndarray:
        """Rows ``local`` of the shard, each inner chunk they fall in copied once and its crc32c checked first."""
        lay = self.layout
        k, data_bytes = lay.per_chunk, lay.chunk_bytes - 4
        out = np.empty((local.size, *lay.shape[1:]), lay.dtype)
        chunk = local // k
        order = np.argsort(chunk, kind="stable")
        sorted_chunks = chunk[order]
        starts = np.flatnonzero(np.concatenate([[True], sorted_chunks[1:] != sorted_chunks[:-1]])) if local.size \
            else np.empty(0, np.int64)
        ends = np.append(starts[1:], local.size)
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            c = int(sorted_chunks[a])
            offset = int(shard.offsets[c])
            data = shard.mapped[offset:offset + data_bytes]  # a copy: what is checked is what is returned
            stored = int.from_bytes(shard.mapped[offset + data_bytes:offset + lay.chunk_bytes], "little")
            if google_crc32c.value(data) != stored:
                raise LakeError(f"corrupt lake array {self.describe}: inner chunk {c} of {shard.where} fails its "
                                "crc32c check (bytes changed after commit); run `lepton-jax lake verify`")
            rows = np.frombuffer(data, lay.dtype).reshape(k, *lay.shape[1:])
            pick = order[a:b]
            out[pick] = rows[local[pick] % k]
        return out

    def _shard(self, s: int) -> MappedShard:
        """Shard ``s``, from the process-wide cache of at most :data:`MAX_MAPPED_SHARDS` mapped shards (the least
        recently used mapping is dropped; a re-map re-reads the index)."""
        key = (self._token, s)
        with _mapped_lock:
            view = _mapped.get(key)
            if view is not None:
                _mapped.move_to_end(key)
                return view
        view = self._open_shard(s)
        with _mapped_lock:
            _mapped[key] = view
            _mapped.move_to_end(key)
            while len(_mapped) > MAX_MAPPED_SHARDS:
                _mapped.popitem(last=False)  # unmapped (and its descriptor closed) once no read still uses it
        return view

    def _open_shard(self, s: int) -> MappedShard:
        lay = self.layout
        rel = lay.shard_key(s)
        where = f"{self.describe}/{rel}"
        info = self.files.get(rel)
        if info is None:
            raise LakeError(f"lake file {where} is not listed in its commit record; run `lepton-jax lake verify`")
        try:
            with open(self.path / rel, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size != int(info["bytes"]):
                    raise LakeError(f"lake file {where} has {st.st_size} bytes, not {info['bytes']}; "
                                    "run `lepton-jax lake verify`")
                extra = {"trackfd": False} if sys.version_info >= (3, 13) else {}
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ, **extra)
        except OSError as e:
            raise LakeError(f"cannot read lake file {where}: {e}; run `lepton-jax lake verify`") from e
        buf = np.frombuffer(mapped, np.uint8)
        index = bytes(buf[max(0, buf.size - lay.index_bytes):])
        if len(index) < lay.index_bytes or google_crc32c.value(index[:-4]) != int.from_bytes(index[-4:], "little"):
            raise LakeError(f"corrupt lake array {self.describe}: shard index checksum mismatch in {rel}")
        entries = np.frombuffer(index[:-4], "<u8").reshape(-1, 2)
        chunks = -(-min(lay.per_shard, lay.shape[0] - s * lay.per_shard) // lay.per_chunk)
        offsets, sizes = entries[:chunks, 0], entries[:chunks, 1]
        data_end = buf.size - lay.index_bytes
        if (np.any(offsets == MISSING) or np.any(sizes != lay.chunk_bytes)
                or np.any(offsets > data_end - lay.chunk_bytes)):
            raise LakeError(f"corrupt lake array {self.describe}: shard {rel} has missing or misplaced chunks")
        offsets = offsets.astype(np.int64)
        example_strides = np.empty((lay.per_chunk, *lay.shape[1:]), lay.dtype).strides
        if chunks == 1 or np.all(np.diff(offsets) == lay.chunk_bytes):
            view: Any = np.ndarray((chunks, lay.per_chunk, *lay.shape[1:]), lay.dtype, buffer=mapped,
                                   offset=int(offsets[0]), strides=(lay.chunk_bytes, *example_strides))
        else:
            view = [np.ndarray((lay.per_chunk, *lay.shape[1:]), lay.dtype, buffer=mapped, offset=int(o),
                               strides=example_strides) for o in offsets.tolist()]
        return MappedShard(view, mapped, offsets, where)

