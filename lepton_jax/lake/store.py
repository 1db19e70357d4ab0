"""Lake tables, versions, atomic commits, verification and garbage collection.

Layout of a lake rooted at ``ROOT``::

    ROOT/<table>/_log/00000001.json                        one commit record per version (append-only)
    ROOT/<table>/data/<commit-id>/<split>/<frag>/<array>/  a fragment's zarr v3 arrays, written once
    ROOT/<table>/data/<commit-id>/<split>/<frag>/_rows.sha256   its row hashes (32 bytes per row)
    ROOT/<table>/data/<commit-id>/_quarantine/...          rejected examples of that commit (entries + fragments)

A version's record lists, per split, the fragments (by path relative to the table) whose concatenation is the split.
An append's record lists the previous version's fragments plus the new ones, so old data is never copied; compaction
publishes a version whose fragments are merged and whose logical content digest is unchanged.

A commit writes its fragments under a fresh ``data/<commit-id>/``, makes them durable, and then publishes the record
with the storage's exclusive create (:mod:`lepton_jax.lake.storage`: ``os.link`` from an fsynced temp file on a local
disk, a conditional PUT on S3/GCS): if another writer already published that version, the create fails and this
writer gets a :class:`CommitConflictError` (or, when asked to retry, re-reads the latest version and publishes on top
of it). Readers list ``_log`` and see only whole versions; a crash before the create leaves the previous version as
the latest, and its unreferenced data is removed by :meth:`Lake.gc`. ``ROOT`` is a local directory,
``s3://bucket/prefix`` or ``gs://bucket/prefix``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from lepton_jax.errors import CommitConflictError, LakeError
from lepton_jax.lake import arrays, rawshards, records
from lepton_jax.lake.faults import crash_point
from lepton_jax.lake.fragments import (
    _NAME,
    LABEL,
    ROW_HASHES,
    check_name,
    commit_dirs,
    content_sha256,
    logical_arrays,
    merge_partials,
    partial_stats,
    read_row_hashes,
    row_hashes,
    safe_relpath,
    split_fragments,
    write_fragment,
)
from lepton_jax.lake.processes import pid_alive as _pid_alive
from lepton_jax.lake.processes import pid_namespace as _pid_namespace
from lepton_jax.lake.processes import process_start as _process_start
from lepton_jax.lake.records import FORMAT, LOG_DIR
from lepton_jax.lake.storage import Storage, open_storage, storage_clock

DATA_DIR = "data"
QUARANTINE = "_quarantine"
TEMP_PREFIX = ".commit-"
USED_DIR = "_used"  # _log/_used/<version>: an empty marker per version number ever published (never reused)
LEASE_DIR = "_leases"  # _leases/<commit-id>.json: a writer's lease on its commit directory, held until it published
log = logging.getLogger(__name__)

OBJECT_STORE_COMPRESSION = "zstd"  # the default layout of new arrays in a lake on S3/GCS (Lake's docstring)
MIN_GRACE_SECONDS = 60.0  # gc's smallest grace period without force=True
LEASE_HEARTBEAT_SECONDS = MIN_GRACE_SECONDS / 4  # a held lease is rewritten at least this often

__all__ = ["FORMAT", "GcReport", "Lake", "Problem", "SplitReader", "TableVersion", "check_name"]




@dataclasses.dataclass(frozen=True)
class TableVersion:
    """One committed version of a table: its commit record, as published."""

    lake: Lake
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
    the rows gathered are hashed and compared with the fragment's row hashes (``_rows.sha256``, itself checked
    against the record when first loaded; the label array, which row hashes leave out, and fragments without row
    hashes are checked per inner chunk by their crc32c); everything else goes through TensorStore, which checks
    each chunk's crc32c when it reads it from storage; small arrays are read whole once and checked against their
    content digests. ``label_array`` names the array row hashes leave out (the table schema's).
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
        """Every array from memory or the raw fast path, gathered in the order asked for (no sort, no reorder copy),
        and checked: rows of fragments with row hashes against them, the rest per inner chunk (crc32c)."""
        out = {name: value[idx] for name, value in self._in_memory.items()}
        raw_names = list(self._raw[0])
        if len(self.fragments) == 1:
            hashed = self._fragment_row_hashes(0) is not None
            for name in raw_names:
                out[name] = self._raw[0][name].read(idx, verify=not hashed or name == self.label_array)
            if hashed:
                self._check_rows(out, idx, np.zeros(idx.size, np.int64), [0])
            return out
        frag = np.searchsorted(self.offsets, idx, side="right") - 1
        touched = np.unique(frag).tolist()
        hashed = [f for f in touched if self._fragment_row_hashes(f) is not None]
        for name in raw_names:
            meta = self.fragments[0]["arrays"][name]
            value = np.empty((idx.size, *meta["shape"][1:]), meta["dtype"])
            for f in touched:
                mask = frag == f
                value[mask] = self._raw[f][name].read(idx[mask] - self.offsets[f],
                                                      verify=f not in hashed or name == self.label_array)
            out[name] = value
        if hashed:
            self._check_rows(out, idx, frag, hashed)
        return out

    def _fragment_row_hashes(self, f: int) -> np.ndarray | None:
        """Fragment ``f``'s row hashes, read and checked against the record once per reader (None if it has none)."""
        if f not in self._row_hashes:
            frag = self.fragments[f]
            self._row_hashes[f] = (read_row_hashes(self.storage, self.table, frag, self.label_array)
                                   if frag.get("row_hashes") else None)
        return self._row_hashes[f]

    def _check_rows(self, out: dict[str, np.ndarray], idx: np.ndarray, frag: np.ndarray, hashed: list[int]) -> None:
        """Compares the row hashes of the rows read (every non-label array) with the stored ones of the fragments
        ``hashed``; a mismatch is a LakeError naming the shard files that hold the rows."""
        content = {name: value for name, value in out.items() if name != self.label_array}
        if not content:
            return
        got = row_hashes(content, self.label_array)
        for f in hashed:
            mask = frag == f if len(hashed) > 1 or frag.size and np.any(frag != f) else slice(None)
            local = idx[mask] - self.offsets[f]
            bad = np.flatnonzero(np.any(got[mask] != self._row_hashes[f][local], axis=1))
            if bad.size:
                rows = local[bad]
                files = [p for name, raw in self._raw[f].items() if name != self.label_array
                         for p in raw.files_of(rows)]
                raise LakeError(f"corrupt lake data in {', '.join(files)}: {rows.size} row(s) read (e.g. row "
                                f"{int(rows[0])} of fragment {self.fragments[f]['path']}) differ from their row "
                                "hashes (bytes changed after commit); run `lepton-jax lake verify`")

    def _read_range(self, stores: list[dict[str, Any]], start: int, stop: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {name: value[start:stop] for name, value in self._in_memory.items()}
        for name in self.array_names:
            if name in out:
                continue
            if start >= stop:
                meta = self.fragments[0]["arrays"][name]
                out[name] = np.zeros((0, *meta["shape"][1:]), meta["dtype"])
                continue
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
                "_row_hashes": {}}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One finding of :meth:`Lake.verify`: what is wrong, and where."""

    table: str
    version: int | None
    path: str
    message: str

    def __str__(self) -> str:
        at = f"{self.table}@{self.version}" if self.version is not None else self.table
        return f"{at}: {self.path}: {self.message}"


@dataclasses.dataclass
class GcReport:
    """What :meth:`Lake.gc` removed (or would remove, in a dry run) and what it kept because it was too young."""

    removed: list[str]
    bytes_freed: int
    kept_young: list[str]


class Lake:
    """A lake of versioned tables at ``root``: a local directory, ``s3://bucket/prefix`` or ``gs://bucket/prefix``.
    ``target_shard_bytes`` sizes the shard files of new commits and ``compression`` picks their inner-chunk layout
    (:mod:`lepton_jax.lake.arrays`): ``"none"``, raw ~64 KiB chunks, or ``"zstd"``, one compressed example per chunk.
    By default ``"none"`` on a local disk (a random batch is one gather from mapped files) and ``"zstd"`` on an
    object store (a random read fetches one example, not a whole 64 KiB chunk: ``scripts/bench_lake_s3.py``).
    Readers tell the layouts apart per array, so they mix freely in one table."""

    def __init__(self, root: str | Path, *, target_shard_bytes: int = arrays.TARGET_SHARD_BYTES,
                 compression: str | None = None):
        if compression is not None:
            arrays.check_compression(compression)
        self.storage = open_storage(root)  # every key goes through the storage interface; arrays via its kvstore
        self.root = self.storage.root  # a Path for a local lake, the URI for an object store
        self.target_shard_bytes = int(target_shard_bytes)
        local = self.storage.local_path("") is not None
        self.compression = compression or (arrays.DEFAULT_COMPRESSION if local else OBJECT_STORE_COMPRESSION)

    @property
    def uri(self) -> str:
        """The lake's location for records and messages: an absolute path, or the ``s3://``/``gs://`` URI."""
        local = self.storage.local_path("")
        return str(local.resolve()) if local is not None else self.storage.uri

    def exists(self) -> bool:
        """Whether the lake root exists (a local directory; an object-store prefix holding anything)."""
        local = self.storage.local_path("")
        return local.is_dir() if local is not None else bool(self.storage.list(""))

    def require(self) -> Lake:
        """This lake, or one clear LakeError when its root does not exist (for commands that only read)."""
        if not self.exists():
            raise LakeError(f"lake {self.root} does not exist; create one with `lepton-jax lake ingest --lake "
                            f"{self.root} --table NAME --source ...` (or check the --lake path)")
        return self

    def tables(self) -> list[str]:
        """Tables with anything in their log (a table whose records were all removed is still named, by its
        ``_used`` markers, so ``verify`` can report it)."""
        return [n for n in self.storage.list("") if _NAME.match(n) and self.storage.list(f"{n}/{LOG_DIR}/")]

    def versions(self, table: str) -> list[int]:
        names = self.storage.list(f"{check_name('table', table)}/{LOG_DIR}/")
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def table(self, table: str, version: int | None = None) -> TableVersion:
        """The committed version ``version`` of ``table`` (default: the latest)."""
        check_name("table", table)
        versions = self.versions(table)
        if not versions:
            self.require()
            known = ", ".join(self.tables()) or "none"
            raise LakeError(f"lake {self.root} has no table {table!r} (tables: {known}); "
                            f"create it with `lepton-jax lake ingest --lake {self.root} --table {table}`")
        version = versions[-1] if version is None else int(version)
        if version not in versions:
            raise LakeError(f"table {table!r} has no version {version}; versions: {versions}")
        path = self._record_path(table, version)
        try:
            payload = self.storage.read(self._record_key(table, version))
        except OSError as e:
            raise LakeError(f"commit record {path} is unreadable ({e}); the lake is corrupt") from e
        return TableVersion(self, table, records.parse(payload, version, path))

    def _record_path(self, table: str, version: int) -> str:
        return self.storage.describe(self._record_key(table, version))

    @staticmethod
    def _record_key(table: str, version: int) -> str:
        return records.record_key(table, version)

    def _used_versions(self, table: str) -> list[int]:
        return sorted(int(n) for n in self.storage.list(f"{table}/{LOG_DIR}/{USED_DIR}/") if n.isdigit())

    def missing_versions(self, table: str) -> list[int]:
        """Version numbers of ``table`` that were published but whose records are gone (a damaged log: the latest
        version a reader sees is then not the latest one written); :meth:`check_log` reports them in full."""
        used = self._used_versions(table)  # markers first: see check_log
        versions = self.versions(table)
        return sorted(set(range(1, max([*versions, *used], default=0) + 1)) - set(versions))

    # -- writing ---------------------------------------------------------------------------------------------------

    @staticmethod
    def new_commit_id() -> str:
        """A fresh, unique directory name for a commit's data."""
        return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"

    def write_fragment(self, table: str, rel: str, named: dict[str, np.ndarray], *, label_array: str = LABEL,
                       crash: bool = False, hashes: np.ndarray | None = None) -> dict[str, Any]:
        """Writes one fragment at ``<table>/<rel>`` (``rel`` = ``data/<commit-id>/...``); returns its entry."""
        safe_relpath(rel)
        for part in rel.split("/")[1:]:
            check_name("fragment path component", part)
        return write_fragment(self.storage, check_name("table", table), rel, named,
                              target_shard_bytes=self.target_shard_bytes, label_array=label_array, crash=crash,
                              hashes=hashes, compression=self.compression)

    def write_quarantine_entries(self, table: str, commit_id: str, entries: list[dict[str, Any]]
                                 ) -> dict[str, Any]:
        """Writes a commit's quarantine list; returns ``{"num_examples", "reasons", "entries"}`` for its record."""
        reasons: dict[str, int] = {}
        for e in entries:
            reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
        out: dict[str, Any] = {"num_examples": len(entries), "reasons": dict(sorted(reasons.items()))}
        if not entries:
            return out
        payload = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode()
        self.storage.write(f"{table}/{DATA_DIR}/{commit_id}/{QUARANTINE}/entries.jsonl", payload)
        out["entries"] = {"path": f"{DATA_DIR}/{commit_id}/{QUARANTINE}/entries.jsonl",
                          "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
        return out

    def split_entry(self, table: str, fragments: list[dict[str, Any]], label_array: str = LABEL
                    ) -> dict[str, Any]:
        """A split's record entry from its fragments: example count, logical arrays, logical content digest."""
        if not fragments:
            raise LakeError("a split needs at least one fragment")
        return {"num_examples": sum(int(f["num_examples"]) for f in fragments),
                "arrays": logical_arrays(fragments),
                "content_sha256": content_sha256(self.storage, table, fragments, label_array),
                "fragments": fragments}

    def publish(self, table: str, commit_id: str, *, splits: dict[str, list[dict[str, Any]]],
                schema: dict[str, Any], lineage: dict[str, Any], stats: dict[str, Any] | None = None,
                quarantine: dict[str, Any] | None = None, parent: int | None = None, retries: int = 0,
                rebase: Callable[[TableVersion], TableVersion | None] | None = None,
                keep_on_conflict: bool = False) -> TableVersion:
        """Publishes a version whose splits are the given fragments (new ones under ``data/<commit_id>/``, and any
        fragments of earlier versions, which are shared, not copied).

        ``parent`` is the version this commit builds on (default: the latest when called; 0 = an empty table). If
        another writer has published ``parent + 1`` meanwhile, raises :class:`CommitConflictError` and removes the
        data it wrote — unless ``retries`` > 0: then it re-reads the latest version, asks ``rebase(latest)`` whether
        the commit is still wanted (a returned version means "no, use this one"), and publishes on top of it.
        ``keep_on_conflict`` leaves the data in place on a conflict (the caller rebuilds the record and retries).
        """
        check_name("table", table)
        if parent is None:
            versions = self.versions(table)
            parent = versions[-1] if versions else 0
        commit_dir = f"{table}/{DATA_DIR}/{commit_id}"
        label_array = schema.get("label_array", LABEL)
        try:
            split_entries = {check_name("split", split): self.split_entry(table, frags, label_array)
                             for split, frags in splits.items()}
            self.storage.sync(commit_dir)  # local: fsync the tree and its directory entries; object stores: no-op
        except BaseException:
            self._discard(commit_dir)
            raise
        crash_point("data")
        while True:
            version = parent + 1
            record = records.seal({"table": table, "version": version, "parent": parent or None,
                                   "commit_id": commit_id, "time": time.time(), "schema": schema, "lineage": lineage,
                                   "stats": stats or {}, "splits": split_entries, "quarantine": quarantine or {}})
            local = self.storage.local_path(commit_dir)
            if local is not None and local.exists():  # a long-running commit refreshes its age for gc's grace
                os.utime(local)
            try:
                self._check_written(table, commit_id, split_entries, quarantine or {})
                self._publish(table, version, record)
                return TableVersion(self, table, record)
            except CommitConflictError:
                if retries <= 0:
                    if not keep_on_conflict:
                        self._discard(commit_dir)
                    raise
                retries -= 1
                latest = self.table(table)
                try:  # every check the caller ran against the old head runs again against the new one
                    existing = rebase(latest) if rebase is not None else None
                except BaseException:
                    if not keep_on_conflict:
                        self._discard(commit_dir)
                    raise
                if existing is not None:
                    self._discard(commit_dir)
                    return existing
                parent = latest.version
            except LakeError:
                if self.is_published(table, commit_id):  # the create landed but its answer was lost (timeout)
                    return self.table(table, next(v for v in reversed(self.versions(table))
                                                  if self._commit_id(table, v) == commit_id))
                if not keep_on_conflict:
                    self._discard(commit_dir)
                raise

    def _commit_id(self, table: str, version: int) -> str | None:
        try:
            return json.loads(self.storage.read(self._record_key(table, version))).get("commit_id")
        except (OSError, ValueError, LakeError, AttributeError):
            return None

    def is_published(self, table: str, commit_id: str, *, newest: int = 8) -> bool:
        """Whether one of the ``newest`` versions of ``table`` holds the commit ``commit_id`` (its data must never
        be discarded then, whatever failed after its record was created)."""
        try:
            versions = self.versions(table)
        except (OSError, LakeError):
            return False
        return any(self._commit_id(table, v) == commit_id for v in reversed(versions[-newest:]))

    def _check_written(self, table: str, commit_id: str, splits: dict[str, dict[str, Any]],
                       quarantine: dict[str, Any]) -> None:
        """Right before publishing: every file this commit wrote still exists with its recorded size (a record
        never names data that is not there, whatever happened to the directory meanwhile). Checked against one
        recursive listing of ``data/<commit_id>/``, so a commit of many fragments costs a few LIST requests on an
        object store, not one HEAD per file."""
        prefix = f"{DATA_DIR}/{commit_id}/"
        groups = [split_fragments(e) for e in splits.values()]
        if quarantine.get("fragments"):
            groups.append(quarantine["fragments"])
        files: list[tuple[str, int]] = []
        for frag in (f for g in groups for f in g if f["path"].startswith(prefix)):
            for meta in frag["arrays"].values():
                files += [(f"{meta['path']}/{rel}", int(info["bytes"])) for rel, info in meta.get("files", {}).items()]
            if frag.get("row_hashes"):
                files.append((frag["row_hashes"]["path"], int(frag["row_hashes"]["bytes"])))
        if quarantine.get("entries", {}).get("path", "").startswith(prefix):
            files.append((quarantine["entries"]["path"], int(quarantine["entries"]["bytes"])))
        if not files:
            return
        # one listing of the commit's directory (a LIST per 1,000 objects on an object store), not a stat per file
        listed = self.storage.list_recursive(f"{table}/{prefix.rstrip('/')}")
        for rel, size in files:
            found = listed.get(rel[len(prefix):])
            if found is None or found[0] != size:
                raise LakeError(f"commit {commit_id} of table {table!r}: {rel} is missing or changed before it was "
                                "published (removed by `lake gc --force`?); nothing was published")

    def commit(self, table: str, splits: dict[str, dict[str, np.ndarray]], *, schema: dict[str, Any],
               lineage: dict[str, Any], stats: dict[str, Any] | None = None, parent: int | None = None,
               quarantine: dict[str, Any] | None = None, retries: int = 0,
               rebase: Callable[[TableVersion], TableVersion | None] | None = None) -> TableVersion:
        """Writes ``splits`` (split -> array name -> array), one fragment each, as a new version and publishes it
        atomically (see :meth:`publish` for ``parent``, ``retries`` and ``rebase``).

        ``quarantine`` holds the rejected examples: ``{"entries": [dict, ...], "arrays": {name: array}}``.
        """
        check_name("table", table)
        commit_id = self.new_commit_id()
        commit_dir = f"{table}/{DATA_DIR}/{commit_id}"
        label_array = schema.get("label_array", LABEL)
        with self.lease(table, commit_id):
            try:
                fragments = {}
                for k, (split, named) in enumerate(splits.items()):
                    rel = f"{DATA_DIR}/{commit_id}/{check_name('split', split)}/00000"
                    fragments[split] = [self.write_fragment(table, rel, named, label_array=label_array, crash=k == 0)]
                q = quarantine or {}
                q_entry = self.write_quarantine_entries(table, commit_id, list(q.get("entries", [])))
                named = q.get("arrays") or {}
                if named and next(iter(named.values())).shape[0]:
                    q_entry["fragments"] = [self.write_fragment(table, f"{DATA_DIR}/{commit_id}/{QUARANTINE}/00000",
                                                                named, label_array=label_array)]
                    q_entry["num_rows"] = int(next(iter(named.values())).shape[0])
            except BaseException:
                self._discard(commit_dir)
                raise
            return self.publish(table, commit_id, splits=fragments, schema=schema, lineage=lineage, stats=stats,
                                quarantine=q_entry, parent=parent, retries=retries, rebase=rebase)

    def _publish(self, table: str, version: int, record: dict[str, Any]) -> None:
        """Publishes ``record`` as ``version``: an exclusive create of ``_log/<version>.json``, then the marker
        ``_log/_used/<version>`` (version numbers are never reused: a marker without its record means the record
        was removed, and this refuses to publish that number again)."""
        if version in self._used_versions(table) and version not in self.versions(table):
            raise LakeError(f"table {table!r} version {version} was published before and its record "
                            f"{self._record_path(table, version)} is gone; the log is damaged, nothing was "
                            "published (run `lepton-jax lake verify`)")
        payload = records.encode(record)
        if not self.storage.create(self._record_key(table, version), payload,
                                   temp_prefix=f"{TEMP_PREFIX}{record['commit_id']}-"):
            raise CommitConflictError(f"table {table!r} version {version} was committed by another writer; "
                                      "re-read the latest version and commit on top of it")
        try:  # the record is published: a failure from here on must not make the caller discard its data
            self._mark_used(table, version)
            self.storage.sync(table, tree=False)  # local: the table directory's entry, on a table's first commit
        except (OSError, LakeError) as e:
            log.warning("table %r version %d is published, but its used-version marker or fsync failed (%s); "
                        "`lepton-jax lake verify` checks the log", table, version, e)

    def _discard(self, key: str) -> None:
        """Removes a failed commit's data, best effort (what is left is gc's)."""
        with contextlib.suppress(OSError, LakeError):
            self.storage.delete_prefix(key)

    def _mark_used(self, table: str, version: int) -> None:
        self.storage.create(f"{table}/{LOG_DIR}/{USED_DIR}/{version:08d}", b"")

    @contextlib.contextmanager
    def lease(self, table: str, commit_id: str) -> Iterator[Callable[[], None]]:
        """Holds a lease on ``data/<commit_id>`` while a writer writes and publishes it: :meth:`gc` never removes
        data (or temp records) of a commit whose lease is live. Yields ``touch()``, which renews the lease (for
        writers on other hosts and on object stores, whose liveness gc can only judge by age: the lease object is
        rewritten, so its last-modified time is now). Take it before creating the directory."""
        key = f"{check_name('table', table)}/{LEASE_DIR}/{commit_id}.json"
        info = {"commit_id": commit_id, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": _process_start(os.getpid()), "pid_namespace": _pid_namespace(), "time": time.time()}

        def put() -> None:
            for attempt in range(20):  # another writer's removal of an empty local _leases/ may race this write
                try:
                    self.storage.write(key, json.dumps({**info, "time": time.time()}).encode())
                    return
                except FileNotFoundError:
                    if attempt == 19:
                        raise

        put()
        stop = threading.Event()

        def heartbeat() -> None:  # renews the lease through phases that do not call touch() (hashing, commit)
            while not stop.wait(LEASE_HEARTBEAT_SECONDS):
                with contextlib.suppress(OSError, LakeError):
                    put()

        beat = threading.Thread(target=heartbeat, name=f"lease-{commit_id}", daemon=True)
        beat.start()
        try:
            yield put
        finally:
            stop.set()
            beat.join()
            with contextlib.suppress(OSError, LakeError):
                self.storage.delete(key)
            # a table that got no data (a failed first commit) leaves nothing
            self.storage.prune(f"{table}/{LEASE_DIR}", table)

    def _leases(self, table: str, grace_seconds: float, now: float) -> tuple[set[str], set[str]]:
        """Commit ids whose writer still holds its lease (a process alive on this host, in this PID namespace since
        this boot, with the same pid and start time, on a local lake), or a lease renewed within
        ``max(grace_seconds, MIN_GRACE_SECONDS)`` (another host, another container sharing this host's name and the
        lake's folder, or an object store: by the lease object's last-modified time), and the commit ids of leases
        found expired (their writers died). Ages are taken at ``now``, by the storage's clock
        (:func:`storage_clock`)."""
        live: set[str] = set()
        dead: set[str] = set()
        local = self.storage.local_path("") is not None
        namespace = _pid_namespace()  # pids are comparable only with leases written in this one
        for name in self.storage.list(f"{table}/{LEASE_DIR}/"):
            if not name.endswith(".json"):
                continue
            key = f"{table}/{LEASE_DIR}/{name}"
            age = 0.0  # not even its age known: live
            try:
                st = self.storage.stat(key)
                if st is None:
                    continue  # released meanwhile: the writer published or gave up
                age = now - st[1]
                info = json.loads(self.storage.read(key))
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                info = None  # unreadable (damaged, or a read that failed): live while its age says so
            pid = info.get("pid") if isinstance(info, dict) else None
            if local and isinstance(pid, int) and info.get("host") == socket.gethostname() \
                    and namespace is not None and info.get("pid_namespace") == namespace:
                alive = _pid_alive(pid) and _process_start(pid) == info.get("pid_start")
            else:
                alive = age < max(grace_seconds, MIN_GRACE_SECONDS)
            (live if alive else dead).add(name[:-len(".json")])
        return live, dead

    # -- compaction --------------------------------------------------------------------------------------------------

    def compact(self, table: str, *, target_fragment_bytes: int = 2**30, retries: int = 0,
                relayout: bool = False) -> TableVersion:
        """Publishes a new version of ``table`` whose splits hold the latest version's rows, in the same order, in
        fewer, larger fragments (up to ``target_fragment_bytes`` of raw data each, in this handle's ``compression``
        layout), streaming block by block. With ``relayout``, a split whose one fragment is in another layout is
        rewritten too (e.g. a table written in the raw layout to an object store, where zstd reads far fewer bytes).

        The new version's logical content digest of every split must equal the old one's, or nothing is published.
        Older versions stay readable (time travel) until their data is unreferenced and collected. Returns the
        latest version unchanged if no split has anything to merge (or, with ``relayout``, to convert)."""
        old = self.table(table)

        def rewrite(split: str) -> bool:
            frags = old.fragments(split)
            return len(frags) > 1 or (relayout and any(
                arrays.layout(self.storage, f"{table}/{safe_relpath(m['path'])}") != self.compression
                for f in frags for m in f["arrays"].values()))

        todo = {s for s in old.splits if rewrite(s)}
        if not todo:
            return old
        commit_id = self.new_commit_id()
        commit_dir = f"{table}/{DATA_DIR}/{commit_id}"
        label_array = old.schema.get("label_array", LABEL)
        splits: dict[str, list[dict[str, Any]]] = {}
        with self.lease(table, commit_id):
            try:
                for k, split in enumerate(old.splits):
                    frags = old.fragments(split)
                    if split not in todo:
                        splits[split] = frags
                        continue
                    reader = old.reader(split, cache_bytes=8 * 2**20)
                    row_bytes = sum(int(np.prod(m["shape"][1:])) * np.dtype(m["dtype"]).itemsize
                                    for m in frags[0]["arrays"].values())
                    per_frag = max(1, int(target_fragment_bytes) // max(row_bytes, 1))
                    splits[split] = []
                    for j, start in enumerate(range(0, len(reader), per_frag)):
                        stop = min(start + per_frag, len(reader))
                        rel = f"{DATA_DIR}/{commit_id}/{split}/{j:05d}"
                        splits[split].append(self._copy_fragment(table, rel, reader, start, stop, label_array,
                                                                 crash=k == 0 and j == 0))
                body = {key: old.record[key] for key in ("schema", "stats", "quarantine")}
                lineage = {**old.record["lineage"], "compacted_from": old.version}
                for split, frags in splits.items():
                    new = content_sha256(self.storage, table, frags, label_array)
                    if new != old.record["splits"][split].get("content_sha256", new):
                        raise LakeError(f"internal error: compacting {table!r} split {split!r} changed its content "
                                        "digest; nothing was published")
            except BaseException:
                self._discard(commit_dir)
                raise
            version = self.publish(table, commit_id, splits=splits, lineage=lineage, parent=old.version,
                                   retries=retries, rebase=_recompact, **body)
        crash_point("committed")
        return version

    def _copy_fragment(self, table: str, rel: str, reader: SplitReader, start: int, stop: int, label_array: str,
                       crash: bool) -> dict[str, Any]:
        """Writes rows ``[start, stop)`` of ``reader`` as one new fragment, in one pass of bounded-size blocks."""
        base = f"{table}/{rel}"
        metas = reader.fragments[0]["arrays"]
        row_bytes = sum(int(np.prod(m["shape"][1:])) * np.dtype(m["dtype"]).itemsize for m in metas.values())
        block_rows = max(1, 16 * 2**20 // max(1, row_bytes))
        writers = {name: arrays.ArrayWriter(self.storage, f"{base}/{check_name('array', name)}",
                                            (stop - start, *m["shape"][1:]),
                                            np.dtype(m["dtype"]), target_shard_bytes=self.target_shard_bytes,
                                            compression=self.compression)
                   for name, m in metas.items()}
        stats_parts, hash_parts = [], []
        for a in range(start, stop, block_rows):
            block = reader.read(slice(a, min(a + block_rows, stop)))
            for name, w in writers.items():
                w.write(block[name])
            stats_parts.append(partial_stats(block, label_array))
            hash_parts.append(row_hashes(block, label_array))
            if crash and a == start:
                crash_point("shard")
        entry: dict[str, Any] = {"path": rel, "num_examples": stop - start, "arrays": {}}
        for k, (name, w) in enumerate(writers.items()):
            entry["arrays"][name] = {"path": f"{rel}/{name}", "dtype": metas[name]["dtype"],
                                     "shape": [stop - start, *metas[name]["shape"][1:]], "sha256": w.close(),
                                     "files": arrays.file_digests(self.storage, f"{base}/{name}")}
            if crash and k == 0:
                crash_point("array")
        payload = np.concatenate(hash_parts).tobytes()
        self.storage.write(f"{base}/{ROW_HASHES}", payload)
        entry["row_hashes"] = {"path": f"{rel}/{ROW_HASHES}", "bytes": len(payload),
                               "sha256": hashlib.sha256(payload).hexdigest()}
        entry["stats"] = merge_partials(stats_parts)
        return entry

    # -- checking and cleaning up ------------------------------------------------------------------------------------

    def verify(self, table: str | None = None, version: int | None = None, *,
               content: bool = True) -> list[Problem]:
        """Re-checks every file digest (and, with ``content``, every array's content digest and every split's
        logical content digest) of every version of ``table`` (default: all tables; ``version`` narrows to one).
        Fragments shared by several versions are checked once. Returns every problem found; empty = intact."""
        problems: list[Problem] = []
        tables = [check_name("table", table)] if table else self.tables()
        if table and not self.versions(table):
            self.table(table)  # raises the 'no such table' error
        for name in tables:
            broken = self.check_log(name)
            problems += broken if version is None else [p for p in broken if p.version == int(version)]
            checked: dict[str, list[str]] = {}  # fragment path -> problems found in it
            for v in ([int(version)] if version is not None else self.versions(name)):
                try:
                    tv = self.table(name, v)
                except LakeError as e:
                    if not any(p.version == v for p in broken):  # (check_log named it already)
                        problems.append(Problem(name, v, str(self._record_path(name, v)), str(e)))
                    continue
                problems += self._verify_version(tv, content, checked)
        return problems

    def _verify_version(self, tv: TableVersion, content: bool, checked: dict[str, list[str]]) -> list[Problem]:
        problems: list[Problem] = []
        q = tv.record.get("quarantine") or {}
        if q.get("entries"):
            try:
                tv.quarantine()
            except LakeError as e:
                problems.append(Problem(tv.table, tv.version, q["entries"]["path"], str(e)))
        groups = [(split, split_fragments(e)) for split, e in tv.record["splits"].items()]
        if q.get("arrays") or q.get("fragments"):
            groups.append((QUARANTINE, split_fragments({**q, "num_examples": q.get("num_rows", 0)})))
        label_array = tv.schema.get("label_array", LABEL)
        for split, frags in groups:
            bad_before = len(problems)
            for frag in frags:
                if frag["path"] not in checked:
                    found = [p for meta in frag["arrays"].values() for p in self._verify_array(tv, meta, content)]
                    found += self._verify_row_hashes(tv, frag, label_array, content and not found)
                    checked[frag["path"]] = [(p.path, p.message) for p in found]
                problems += [Problem(tv.table, tv.version, path, msg) for path, msg in checked[frag["path"]]]
            expected = tv.record["splits"].get(split, {}).get("content_sha256") if split != QUARANTINE else None
            if content and expected and len(problems) == bad_before:
                try:
                    if content_sha256(self.storage, tv.table, frags, label_array) != expected:
                        problems.append(Problem(tv.table, tv.version, split,
                                                "logical content digest differs from the commit record"))
                except LakeError as e:
                    problems.append(Problem(tv.table, tv.version, split, str(e)))
        return problems

    def _verify_row_hashes(self, tv: TableVersion, frag: dict[str, Any], label_array: str,
                           recompute: bool) -> list[Problem]:
        meta = frag.get("row_hashes")
        if meta is None:
            return []
        try:
            stored = read_row_hashes(self.storage, tv.table, frag, label_array)
        except LakeError as e:
            return [Problem(tv.table, tv.version, meta["path"], str(e))]
        if recompute:  # block by block: bounded memory however large the fragment
            reader = SplitReader(self.uri, tv.table, tv.version, frag["path"], {"fragments": [frag]},
                                 cache_bytes=8 * 2**20)
            row_bytes = sum(int(np.prod(m["shape"][1:])) * np.dtype(m["dtype"]).itemsize
                            for m in frag["arrays"].values())
            rows = max(1, 16 * 2**20 // max(1, row_bytes))
            start = 0
            for block in reader.iter_blocks(rows):
                n = next(iter(block.values())).shape[0]
                if not np.array_equal(row_hashes(block, label_array), stored[start:start + n]):
                    return [Problem(tv.table, tv.version, meta["path"], "row hashes differ from the fragment's data")]
                start += n
            if start != stored.shape[0]:
                return [Problem(tv.table, tv.version, meta["path"], f"{stored.shape[0]} row hashes for {start} rows")]
        return []

    def _verify_array(self, tv: TableVersion, meta: dict[str, Any], content: bool) -> list[Problem]:
        problems: list[Problem] = []
        try:
            key = f"{tv.table}/{safe_relpath(meta['path'])}"
        except LakeError as e:
            return [Problem(tv.table, tv.version, str(meta.get("path")), str(e))]

        def bad(rel: str, message: str) -> None:
            problems.append(Problem(tv.table, tv.version, f"{meta['path']}/{rel}" if rel else meta["path"], message))

        files = meta.get("files")
        if files is not None:
            found = self.storage.list_recursive(key)
            for rel, info in files.items():
                if rel not in found:
                    bad(rel, "missing file")
                elif found[rel][0] != info["bytes"]:
                    bad(rel, f"truncated or extended: {found[rel][0]} bytes, recorded {info['bytes']}")
                elif self.storage.sha256(f"{key}/{rel}") != info["sha256"]:
                    bad(rel, "sha256 differs from the commit record (bytes changed)")
            for rel in sorted(set(found) - set(files)):
                bad(rel, "file not listed in the commit record")
        if content and not problems:
            try:
                store = arrays.open_array(self.storage, key)
                if arrays.stored_content_digest(store, path=meta["path"]) != meta["sha256"]:
                    bad("", "content digest differs from the commit record")
            except LakeError as e:
                bad("", str(e))
        return problems

    def check_log(self, table: str) -> list[Problem]:
        """Checks ``table``'s history itself: versions contiguous from 1, every record readable and naming the
        previous version as its parent, and every version number ever published (``_log/_used``) still present."""
        problems: list[Problem] = []
        # markers first: a writer creates a version's record before its marker, so every marker listed here has its
        # record in the listing that follows (the other order reports a commit landing in between as a gap)
        missing = self.missing_versions(table)
        versions = self.versions(table)
        top = max([*versions, *missing], default=0)
        for v in missing:
            what = "the latest version" if v == top else f"between versions {v - 1 or '-'} and {v + 1}"
            problems.append(Problem(table, v, str(self._record_path(table, v)),
                                    f"gap in the log: the record of version {v} ({what}) is missing"))
        for v in versions:
            try:
                record = self.table(table, v).record
            except LakeError as e:
                problems.append(Problem(table, v, str(self._record_path(table, v)), f"unreadable record: {e}"))
                continue
            parent = record.get("parent") or 0
            if parent != v - 1:
                problems.append(Problem(table, v, str(self._record_path(table, v)),
                                        f"broken chain: parent is {parent or 'none'}, not version {v - 1 or 'none'}"))
        return problems

    def gc(self, grace_seconds: float = 3600.0, *, table: str | None = None, dry_run: bool = False,
           force: bool = False) -> GcReport:
        """Removes commit data no version record references (left by crashed or conflicting writers) and stale
        temp records, but never data of a commit whose writer holds a live lease (:meth:`lease`), and only what is
        older than ``grace_seconds`` (at least :data:`MIN_GRACE_SECONDS` unless ``force``). Every published version
        stays readable: a commit directory is live while any version lists one of its fragments. A table whose log
        has a gap or an unreadable record is not collected (its liveness cannot be known): that is an error."""
        grace = float(grace_seconds)
        if not math.isfinite(grace) or grace < 0:
            raise LakeError(f"gc grace period must be a finite number of seconds >= 0, got {grace_seconds}")
        if grace < MIN_GRACE_SECONDS and not force:
            raise LakeError(f"gc grace period {grace:g} s is below the minimum {MIN_GRACE_SECONDS:g} s; pass "
                            "force=True (--force) to use it (live writers' leases are still honoured)")
        report = GcReport([], 0, [])
        failed: list[str] = []
        if not self.exists():  # nothing to collect, and the clock probe must not create the root
            return report
        now = storage_clock(self.storage)  # ages compare the storage's timestamps with the storage's clock
        for name in ([check_name("table", table)] if table else self.tables()):
            candidates = [f"{name}/{DATA_DIR}/{n}" for n in self.storage.list(f"{name}/{DATA_DIR}/")]
            candidates += [f"{name}/{LOG_DIR}/{n}" for n in self.storage.list(f"{name}/{LOG_DIR}/")
                           if n.startswith(TEMP_PREFIX)]
            # order matters: leases are read after listing (a listed directory's writer took its lease before
            # creating it) and records after leases (a writer publishes its record before releasing its lease)
            leased, expired = self._leases(name, grace, now)
            broken = self.check_log(name)
            if broken:
                raise LakeError(f"not collecting table {name!r}: {broken[0]}; run `lepton-jax lake verify`")
            live: set[str] = set()
            for v in self.versions(name):
                record = self.table(name, v).record
                live |= commit_dirs(record) | {record["commit_id"]}
            for rel in candidates:
                parent, leaf = rel.rsplit("/", 2)[-2:]
                is_data = parent == DATA_DIR
                cid = leaf if is_data else leaf[len(TEMP_PREFIX):].rsplit("-", 1)[0]
                if is_data and cid in live:
                    continue
                try:
                    found = self.storage.tree(rel)
                    if found is None:
                        continue  # removed meanwhile by its writer (a failed commit cleans up after itself)
                    size, newest = found
                    if cid in leased or now - newest < grace:
                        report.kept_young.append(rel)
                        continue
                    if not dry_run:
                        self.storage.delete_prefix(rel)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    failed.append(f"{rel}: {e.strerror or e}")
                    continue
                except LakeError as e:
                    failed.append(f"{rel}: {e}")
                    continue
                report.removed.append(rel)
                report.bytes_freed += size
            if not dry_run:  # expired leases (dead writers) whose data is gone
                for cid in sorted(expired):
                    if self.storage.tree(f"{name}/{DATA_DIR}/{cid}") is None:
                        self.storage.delete(f"{name}/{LEASE_DIR}/{cid}.json")
        if failed:
            raise LakeError(f"gc could not remove {len(failed)} path(s), e.g. {failed[0]} "
                            f"(removed {len(report.removed)})")
        return report


def _recompact(latest: TableVersion) -> NoReturn:
    """A compaction that lost the race holds the old head's rows only: publishing it on top would drop the winner's."""
    raise CommitConflictError(f"table {latest.table!r} got version {latest.version} while it was being compacted; "
                              "nothing was published (run `lake compact` again)")

