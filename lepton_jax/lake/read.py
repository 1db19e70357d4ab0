"""Reading a pinned table version: :class:`TableVersion` (one published commit record) and :class:`SplitReader`
(random access to one split as one logical array per name across its fragments, every byte it returns checked)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from lepton_jax.errors import LakeError
from lepton_jax.lake import arrays, rawshards
from lepton_jax.lake.fragments import (
    KEYS_FIRST,
    LABEL,
    fragment_row_keys,
    read_row_checks,
    read_row_hashes,
    row_checks,
    row_hashes,
    row_keys,
    safe_relpath,
    split_fragments,
    table_row_hash,
)
from lepton_jax.lake.records import QUARANTINE
from lepton_jax.lake.storage import Storage, open_storage

# Raw fast-path reads run one at a time per process. They are CPU work in many short numpy calls and one hash call
# per row, each holding the GIL, with GIL hand-offs between them (a gather per fragment and shard); concurrent readers
# (Grain's read threads) then pass the GIL back and forth and lose throughput. scripts/bench_read_lock.py measures
# the Grain loader with and without this lock (docs/lake.md quotes it). Grain's own work overlaps the reads. It also
# guards each reader's lazily loaded row checks and hashes.
_RAW_LOCK = threading.Lock()


def _new_raw_lock() -> None:
    global _RAW_LOCK
    _RAW_LOCK = threading.Lock()  # a child forked while another thread held it starts with it free


os.register_at_fork(after_in_child=_new_raw_lock)


@dataclasses.dataclass(frozen=True)
class TableVersion:
    """One committed version of a table: its commit record, as published."""

    lake: Any  # the lepton_jax.lake.store.Lake it was read from (store imports this module)
    table: str
    record: dict[str, Any]

    @property
    def version(self) -> int:
        return int(self.record["version"])

    @property
    def schema(self) -> dict[str, Any]:
        return self.record["schema"]

    @property
    def splits(self) -> list[str]:
        return list(self.record["splits"])

    @property
    def label_names(self) -> list[str]:
        return list(self.schema["label_names"])

    def num_examples(self, split: str) -> int:
        return int(self._split(split)["num_examples"])

    def fragments(self, split: str) -> list[dict[str, Any]]:
        """The fragments whose concatenation is ``split``, in order (each with ``path``, ``num_examples`` and
        per array ``path``, ``dtype``, ``shape``, ``sha256`` and file digests)."""
        return split_fragments(self._split(split))

    @property
    def row_hash(self) -> str:
        """The hash that identifies this version's rows (:func:`~lepton_jax.lake.fragments.table_row_hash` of its
        splits' fragments)."""
        return table_row_hash(f for s in self.splits for f in self.fragments(s))

    def reader(self, split: str, *, cache_bytes: int = arrays.READ_CACHE_BYTES) -> SplitReader:
        """Random access to ``split`` as one logical array per name across its fragments; ``cache_bytes`` bounds
        TensorStore's cache of shard indices and decoded chunks (shared by the fragments)."""
        return SplitReader(self.lake.uri, self.table, self.version, split, self._split(split),
                           cache_bytes=cache_bytes, label_array=self.schema.get("label_array", LABEL))

    def quarantine(self) -> list[dict[str, Any]]:
        """The examples this version's ingest rejected: one dict per example with ``reason`` (a short code),
        ``detail`` (a sentence), ``id`` (file, row or index in the source), ``label`` and, where the example had
        the table's shape, ``row`` into :meth:`quarantine_reader`."""
        q = self.record.get("quarantine")
        if not q or not q.get("entries"):
            return []
        meta = q["entries"]
        key = f"{self.table}/{safe_relpath(meta['path'])}"
        path = self.lake.storage.describe(key)
        try:
            data = self.lake.storage.read(key)
        except OSError as e:
            raise LakeError(f"quarantine list {path} is unreadable ({e}); run `lepton-jax lake verify`") from e
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise LakeError(f"quarantine list {path} does not match the digest in its commit record")
        return [json.loads(line) for line in data.decode().splitlines() if line]

    def quarantine_reader(self) -> SplitReader | None:
        """Rejected examples that had the table's shape (arrays plus ``label``, -1 if none, and ``source_index``)."""
        q = self.record.get("quarantine") or {}
        if not q.get("arrays") and not q.get("fragments"):
            return None
        return SplitReader(self.lake.uri, self.table, self.version, QUARANTINE, q,
                           label_array=self.schema.get("label_array", LABEL))

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.record["splits"]:
            raise LakeError(f"table {self.table!r} version {self.version} has no split {split!r}; "
                            f"it has {', '.join(self.record['splits'])}")
        return self.record["splits"][split]


class SplitReader:
    """Random access to one split of a pinned table version: one logical array per name over the split's fragments.
    Picklable (it carries the lake's URI, not an open storage); opens TensorStore lazily (one cache pool for all
    fragments).

    Opening checks that every file the commit record lists exists with its recorded size, so a missing or truncated
    shard is an error naming the file rather than fill values. Every byte returned is checked: random batches of
    local arrays in the raw layout are served by :mod:`lepton_jax.lake.rawshards` (one numpy gather per shard), and
    the rows gathered are re-hashed and compared with what the fragment stores: the first 8 bytes of each row hash
    (the keys at the head of its hash file, one ranged read checked against the record when first needed), or, where
    the fragment has them (sha256 tables, and xxh3-128 fragments written before keys served), its row checks
    (``_rows.xxh3``: the xxh3-64 of each row), or, for fragments written before either, its whole row hashes; the
    label array, which all leave out, and fragments with none are checked per inner chunk by their crc32c.
    Everything else goes through TensorStore, which checks each chunk's crc32c when it reads it from storage; small
    arrays are read whole once, checked against their content digests and served from memory. ``label_array`` names
    the array row hashes and checks leave out (the table schema's).
    """

    #: Arrays of at most this many bytes in total (labels, small features) are read whole on first use, checked
    #: against their content digests, and then served from memory: one chunk per example is the right layout for
    #: images but costs a TensorStore chunk lookup per 4-byte label.
    SMALL_ARRAY_BYTES = 16 * 2**20

    def __init__(self, root: str | Path, table: str, version: int, split: str, entry: dict[str, Any], *,
                 cache_bytes: int = arrays.READ_CACHE_BYTES, label_array: str = LABEL):
        self.root, self.table, self.version, self.split = str(root), table, version, split
        self.label_array = label_array
        self._storage: Storage | None = None
        self.entry, self.cache_bytes = entry, int(cache_bytes)
        self.fragments = split_fragments(entry) if "fragments" in entry or "arrays" in entry else []
        sizes = [int(f["num_examples"]) for f in self.fragments]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._stores: list[dict[str, Any]] | None = None
        self._raw: list[dict[str, rawshards.RawArray | None]] = []
        self._all_raw = False  # every array not held in memory is served by the raw fast path
        self._in_memory: dict[str, np.ndarray] = {}
        self._row_hashes: dict[int, np.ndarray | None] = {}  # fragment -> its checked row hashes (None: has none)
        self._checks: np.ndarray | None = None  # the split's row checks, filled fragment by fragment on first use
        self._checked: dict[int, str] = {}  # fragment -> how the fast path checks its rows (_row_check_mode)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def array_names(self) -> list[str]:
        return list(self.fragments[0]["arrays"]) if self.fragments else []

    @property
    def num_fragments(self) -> int:
        return len(self.fragments)

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = open_storage(self.root)
        return self._storage

    def _open(self) -> list[dict[str, Any]]:
        if self._stores is None:
            context = arrays.read_context(self.cache_bytes)
            stores = [{name: self._open_array(meta, context) for name, meta in frag["arrays"].items()}
                      for frag in self.fragments]
            for name in self.array_names:
                metas = [frag["arrays"][name] for frag in self.fragments]
                total = sum(int(np.prod(m["shape"])) * np.dtype(m["dtype"]).itemsize for m in metas)
                if total > self.SMALL_ARRAY_BYTES:
                    continue
                parts = []
                for meta, st in zip(metas, stores, strict=True):
                    value = arrays.read(st[name], path=meta["path"])
                    if arrays.content_digest(value) != meta["sha256"]:
                        raise LakeError(f"lake array {meta['path']} does not match the digest in its commit "
                                        "record: the data was modified after commit")
                    parts.append(value)
                self._in_memory[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
            self._raw = [{name: self._open_raw(meta) for name, meta in frag["arrays"].items()
                          if name not in self._in_memory} for frag in self.fragments]
            self._all_raw = all(raw is not None for r in self._raw for raw in r.values())
            self._stores = stores
        return self._stores

    def _open_raw(self, meta: dict[str, Any]) -> rawshards.RawArray | None:
        """The fast path for a local array in the raw layout whose record lists its files' digests, else None."""
        key = f"{self.table}/{safe_relpath(meta['path'])}"
        local = self.storage.local_path(key)
        if local is None or not meta.get("files"):
            return None
        raw = rawshards.open_raw(local, meta["files"], self.storage.describe(key))
        if raw is not None and list(raw.layout.shape) != list(meta["shape"]):
            return None  # (TensorStore's open reported the mismatch already)
        return raw

    def _open_array(self, meta: dict[str, Any], context) -> Any:
        storage = self.storage
        key = f"{self.table}/{safe_relpath(meta['path'])}"
        found = storage.list_recursive(key) if meta.get("files") else {}  # one listing per array
        for rel, info in meta.get("files", {}).items():
            size = found[rel][0] if rel in found else None
            if size != info["bytes"]:
                state = "is missing" if size is None else f"has {size} bytes, not {info['bytes']}"
                raise LakeError(f"lake file {storage.describe(f'{key}/{rel}')} {state} (table {self.table!r} "
                                f"version {self.version}); run `lepton-jax lake verify`")
        store = arrays.open_array(storage, key, context=context)
        if "files" not in meta:  # records written before file digests: at least every shard must exist
            for rel in arrays.shard_keys(store):
                if not storage.exists(f"{key}/{rel}"):
                    raise LakeError(f"lake file {storage.describe(f'{key}/{rel}')} is missing (table "
                                    f"{self.table!r} version {self.version}); run `lepton-jax lake verify`")
        if list(store.shape) != list(meta["shape"]) or store.dtype.numpy_dtype != np.dtype(meta["dtype"]):
            raise LakeError(f"lake array {meta['path']} has shape {list(store.shape)} "
                            f"{store.dtype.numpy_dtype}, but its commit record says {meta['shape']} "
                            f"{meta['dtype']}")
        return store

    def read(self, index=slice(None)) -> dict[str, np.ndarray]:
        """Reads ``index`` (int, slice or integer array) from every array of the split.

        Integer arrays are read in sorted order (TensorStore then walks each shard once; about 3x faster for random
        batches), as concurrent requests over the fragments they touch, and returned in the order asked for."""
        stores = self._open()
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return self._read_range(stores, start, max(start, stop))
            index = np.arange(start, stop, step)
        scalar = np.ndim(index) == 0
        idx = np.atleast_1d(np.asarray(index, dtype=np.int64))
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for split {self.split!r} with {n} examples")
        if idx.size and idx.min() < 0:
            idx = np.where(idx < 0, idx + n, idx)
        if self._all_raw and idx.size:
            with _RAW_LOCK:
                out = self._read_raw(idx)
            return {name: value[0] for name, value in out.items()} if scalar else out
        inverse = None
        if idx.size > 1:
            idx, inverse = np.unique(idx, return_inverse=True)
        out = {name: value[idx] for name, value in self._in_memory.items()}
        rest = [name for name in self.array_names if name not in out]
        if rest:
            frag = np.searchsorted(self.offsets, idx, side="right") - 1
            bounds = np.searchsorted(frag, np.arange(len(self.fragments) + 1))
            hit = [f for f in range(len(self.fragments)) if bounds[f + 1] > bounds[f]]
            for name in rest:
                local = {f: idx[bounds[f]:bounds[f + 1]] - self.offsets[f] for f in hit}
                slow = [f for f in hit if self._raw[f].get(name) is None]
                requests = [(stores[f][name], local[f], self.fragments[f]["arrays"][name]["path"]) for f in slow]
                got = dict(zip(slow, arrays.read_many(requests), strict=True)) if slow else {}
                parts = [got[f] if f in got else self._raw[f][name].read(local[f], verify=True) for f in hit]
                if not parts:  # an empty index
                    meta = self.fragments[0]["arrays"][name]
                    parts = [np.zeros((0, *meta["shape"][1:]), meta["dtype"])]
                out[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if inverse is not None:
            out = {name: value[inverse.reshape(-1)] for name, value in out.items()}
        return {name: value[0] for name, value in out.items()} if scalar else out

    def _read_raw(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Every array from memory or the raw fast path (called holding ``_RAW_LOCK``), in the order asked for (rows of
        several fragments grouped by one sort and written back in place), and checked (:meth:`_row_check_mode`):
        rows against their row hashes' keys or their row checks (one vectorised comparison each), rows of older
        fragments against their whole row hashes, everything else, and the label array, which none covers, per
        inner chunk (crc32c)."""
        out = {name: value[idx] for name, value in self._in_memory.items()}
        raw_names = list(self._raw[0])
        if len(self.fragments) == 1:
            frag, groups = None, [(0, None)]
        else:  # rows grouped by fragment: one sort, then a slice per fragment
            frag = np.searchsorted(self.offsets, idx, side="right") - 1
            groups = rawshards.groups(frag)
        mode = {f: self._row_check_mode(f) for f, _ in groups}
        for name in raw_names:
            if frag is None:
                out[name] = self._raw[0][name].read(idx, verify=mode[0] == "crc32c" or name == self.label_array)
                continue
            meta = self.fragments[0]["arrays"][name]
            value = np.empty((idx.size, *meta["shape"][1:]), meta["dtype"])
            for f, rows in groups:
                value[rows] = self._raw[f][name].read(idx[rows] - self.offsets[f],
                                                      verify=mode[f] == "crc32c" or name == self.label_array)
            out[name] = value
        if not any(name != self.label_array for name in raw_names):  # all in memory, checked when loaded
            return out
        content = {name: value for name, value in out.items() if name != self.label_array}
        for kind in ("keys", "checks", "hashes"):
            picked = [(f, rows) for f, rows in groups if mode[f] == kind]
            if not picked:
                continue
            rows = None if len(picked) == len(groups) else np.concatenate([r for _, r in picked])
            part = content if rows is None else {name: value[rows] for name, value in content.items()}
            at = idx if rows is None else idx[rows]
            if kind == "checks":
                bad = np.flatnonzero(row_checks(part, self.label_array) != self._checks[at])
            else:
                row_hash = table_row_hash(self.fragments[f] for f, _ in picked)
                if kind == "keys":
                    bad = np.flatnonzero(row_keys(part, self.label_array, row_hash=row_hash) != self._checks[at])
                else:
                    got = row_hashes(part, self.label_array, row_hash=row_hash)
                    bad = np.flatnonzero(np.any(got != self._split_row_hashes(at, [f for f, _ in picked]), axis=1))
            if bad.size:
                self._corrupt_rows(at[bad], "row checks" if kind == "checks" else "row hashes")
        return out

    def _row_check_mode(self, f: int) -> str:
        """How rows of fragment ``f`` are checked on the fast path: ``"checks"`` (its row checks) or ``"keys"`` (the
        first 8 bytes of its row hashes, read from a keys-first hash file), either loaded into the split-wide array
        on first use; ``"hashes"`` (its whole row hashes) or ``"crc32c"`` (per inner chunk)."""
        state = self._checked.get(f)
        if state is None:  # (under _RAW_LOCK, as every raw read)
            frag = self.fragments[f]
            checks = read_row_checks(self.storage, self.table, frag)
            state = "checks"
            if checks is None and (frag.get("row_hashes") or {}).get("layout") == KEYS_FIRST:
                checks, state = fragment_row_keys(self.storage, self.table, frag, self.label_array), "keys"
            if checks is not None:
                if self._checks is None:
                    self._checks = np.zeros(len(self), np.uint64)
                self._checks[self.offsets[f]:self.offsets[f + 1]] = checks
            else:
                state = "hashes" if self._fragment_row_hashes(f) is not None else "crc32c"
            self._checked[f] = state
        return state

    def _split_row_hashes(self, at: np.ndarray, frags: list[int]) -> np.ndarray:
        """The stored row hashes of split rows ``at``, which lie in fragments ``frags``."""
        out = np.empty((at.size, 32), np.uint8)
        frag = np.searchsorted(self.offsets, at, side="right") - 1
        for f in frags:
            mask = frag == f
            out[mask] = self._row_hashes[f][at[mask] - self.offsets[f]]
        return out

    def _fragment_row_hashes(self, f: int) -> np.ndarray | None:
        """Fragment ``f``'s row hashes, read and checked against the record once per reader (None if it has none)."""
        if f not in self._row_hashes:
            frag = self.fragments[f]
            self._row_hashes[f] = (read_row_hashes(self.storage, self.table, frag, self.label_array)
                                   if frag.get("row_hashes") else None)
        return self._row_hashes[f]

    def _corrupt_rows(self, rows: np.ndarray, what: str) -> None:
        """Raises the LakeError for split rows ``rows`` that differ from their ``what``, naming the shard files."""
        frag = np.searchsorted(self.offsets, rows, side="right") - 1
        f = int(frag[0])
        local = rows[frag == f] - self.offsets[f]
        files = [p for name, raw in self._raw[f].items() if name != self.label_array for p in raw.files_of(local)]
        raise LakeError(f"corrupt lake data in {', '.join(files)}: {rows.size} row(s) read (e.g. row "
                        f"{int(local[0])} of fragment {self.fragments[f]['path']}) differ from their {what} "
                        "(bytes changed after commit); run `lepton-jax lake verify`")

    def _read_range(self, stores: list[dict[str, Any]], start: int, stop: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {name: value[start:stop] for name, value in self._in_memory.items()}
        for name in self.array_names:
            if name in out:
                continue
            if start >= stop:
                meta = self.fragments[0]["arrays"][name]
                out[name] = np.zeros((0, *meta["shape"][1:]), meta["dtype"])
                continue
            arrays.tensorstore_guard()  # the stores were opened by this process or by its parent
            futures = []
            for f, frag in enumerate(self.fragments):
                a, b = max(start, int(self.offsets[f])), min(stop, int(self.offsets[f + 1]))
                if a < b:
                    lo = int(self.offsets[f])
                    futures.append((stores[f][name][a - lo:b - lo].read(), frag["arrays"][name]["path"]))
            try:
                parts = [fut.result() for fut, _ in futures]
            except (ValueError, IndexError) as e:
                raise LakeError(f"corrupt lake array {', '.join(p for _, p in futures)}: {e}") from e
            out[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return out

    def read_all(self, verify: bool = True) -> dict[str, np.ndarray]:
        """Reads the whole split; with ``verify`` every fragment's content digest is checked against the record."""
        data = self.read()
        if verify:
            for name, value in data.items():
                for f, frag in enumerate(self.fragments):
                    meta = frag["arrays"][name]
                    if arrays.content_digest(value[self.offsets[f]:self.offsets[f + 1]]) != meta["sha256"]:
                        raise LakeError(f"lake array {meta['path']} does not match the digest in its commit "
                                        "record: the data was modified after commit")
        return data

    def iter_blocks(self, rows: int) -> Any:
        """The split as consecutive blocks of at most ``rows`` examples (bounded memory), fragment by fragment."""
        for f in range(len(self.fragments)):
            for start in range(int(self.offsets[f]), int(self.offsets[f + 1]), rows):
                yield self.read(slice(start, min(start + rows, int(self.offsets[f + 1]))))

    def __getstate__(self):
        return {**self.__dict__, "_stores": None, "_raw": [], "_all_raw": False, "_in_memory": {}, "_storage": None,
                "_row_hashes": {}, "_checks": None, "_checked": {}}
