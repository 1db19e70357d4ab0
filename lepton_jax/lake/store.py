"""Lake tables, versions, atomic commits, verification and garbage collection.

Layout of a lake rooted at ``ROOT``::

    ROOT/<table>/_log/00000001.json                  one commit record per version (append-only)
    ROOT/<table>/data/<commit-id>/<split>/<array>/   zarr v3 arrays, written once
    ROOT/<table>/data/<commit-id>/_quarantine/...    rejected examples of that commit (entries + arrays)

A commit writes its arrays under a fresh ``data/<commit-id>/``, fsyncs them, and then publishes the record with
``os.link`` from an fsynced temp file, an exclusive create: if another writer already published that version, the
link fails and this writer gets a :class:`CommitConflictError` (or, when asked to retry, re-reads the latest version
and publishes on top of it). Readers list ``_log`` and see only whole versions; a crash before the link leaves the
previous version as the latest, and its unreferenced data is removed by :meth:`Lake.gc`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lepton_jax.errors import CommitConflictError, LakeError
from lepton_jax.lake import arrays
from lepton_jax.lake.faults import crash_point

FORMAT = "lepton-lake/1"
LOG_DIR = "_log"
DATA_DIR = "data"
QUARANTINE = "_quarantine"
TEMP_PREFIX = ".commit-"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def check_name(kind: str, name: str) -> str:
    """Table, split and array names become path components: no separators, no ``..``."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise LakeError(f"invalid {kind} name {name!r}: use letters, digits, '_', '-', '.' "
                        "(no path separators, no '..')")
    return name


def _safe_relpath(rel: str) -> str:
    """A path from a commit record must stay inside its table directory."""
    parts = Path(rel).parts
    if Path(rel).is_absolute() or any(p in ("..", "") for p in parts) or not parts or parts[0] != DATA_DIR:
        raise LakeError(f"commit record names an unsafe array path {rel!r}")
    return rel


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

    def reader(self, split: str, *, cache_bytes: int = arrays.READ_CACHE_BYTES) -> SplitReader:
        """Random access to ``split``; ``cache_bytes`` bounds TensorStore's cache of shard indices and decoded
        chunks (a split that fits is served from memory after its first epoch)."""
        return SplitReader(self.lake.root, self.table, self.version, split, self._split(split),
                           cache_bytes=cache_bytes)

    def quarantine(self) -> list[dict[str, Any]]:
        """The examples this version's ingest rejected: one dict per example with ``reason`` (a short code),
        ``detail`` (a sentence), ``id`` (file, row or index in the source), ``label`` and, where the example had
        the table's shape, ``row`` into :meth:`quarantine_reader`."""
        q = self.record.get("quarantine")
        if not q or not q.get("entries"):
            return []
        meta = q["entries"]
        path = self.lake.root / self.table / _safe_relpath(meta["path"])
        try:
            data = path.read_bytes()
        except OSError as e:
            raise LakeError(f"quarantine list {path} is unreadable ({e}); run `lepton-jax lake verify`") from e
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise LakeError(f"quarantine list {path} does not match the digest in its commit record")
        return [json.loads(line) for line in data.decode().splitlines() if line]

    def quarantine_reader(self) -> SplitReader | None:
        """Rejected examples that had the table's shape (arrays plus ``label``, -1 if none, and ``source_index``)."""
        q = self.record.get("quarantine") or {}
        if not q.get("arrays"):
            return None
        return SplitReader(self.lake.root, self.table, self.version, QUARANTINE, q)

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.record["splits"]:
            raise LakeError(f"table {self.table!r} version {self.version} has no split {split!r}; "
                            f"it has {', '.join(self.record['splits'])}")
        return self.record["splits"][split]


class SplitReader:
    """Random access to one split of a pinned table version. Picklable; opens TensorStore lazily.

    Opening checks that every file the commit record lists exists with its recorded size, so a missing or truncated
    shard is an error naming the file rather than fill values; flipped bytes fail the crc32c checks on read.
    """

    #: Arrays of at most this many bytes (labels, small features) are read whole on first use, checked against
    #: their content digest, and then served from memory: one chunk per example is the right layout for images but
    #: costs a TensorStore chunk lookup per 4-byte label.
    SMALL_ARRAY_BYTES = 16 * 2**20

    def __init__(self, root: Path, table: str, version: int, split: str, entry: dict[str, Any], *,
                 cache_bytes: int = arrays.READ_CACHE_BYTES):
        self.root, self.table, self.version, self.split = Path(root), table, version, split
        self.entry, self.cache_bytes = entry, int(cache_bytes)
        self._stores: dict[str, Any] | None = None
        self._in_memory: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.entry["num_examples"])

    @property
    def array_names(self) -> list[str]:
        return list(self.entry["arrays"])

    def _open(self) -> dict[str, Any]:
        if self._stores is None:
            stores = {}
            for name, meta in self.entry["arrays"].items():
                path = self.root / self.table / _safe_relpath(meta["path"])
                for rel, info in meta.get("files", {}).items():
                    file = path / rel
                    size = file.stat().st_size if file.is_file() else None
                    if size != info["bytes"]:
                        state = "is missing" if size is None else f"has {size} bytes, not {info['bytes']}"
                        raise LakeError(f"lake file {file} {state} (table {self.table!r} version {self.version}); "
                                        "run `lepton-jax lake verify`")
                store = arrays.open_array(path, self.cache_bytes)
                if "files" not in meta:  # records written before file digests: at least every shard must exist
                    for rel in arrays.shard_keys(store):
                        if not (path / rel).is_file():
                            raise LakeError(f"lake file {path / rel} is missing (table {self.table!r} version "
                                            f"{self.version}); run `lepton-jax lake verify`")
                if list(store.shape) != list(meta["shape"]) or store.dtype.numpy_dtype != np.dtype(meta["dtype"]):
                    raise LakeError(f"lake array {meta['path']} has shape {list(store.shape)} "
                                    f"{store.dtype.numpy_dtype}, but its commit record says {meta['shape']} "
                                    f"{meta['dtype']}")
                stores[name] = store
            self._stores = stores
            for name, meta in self.entry["arrays"].items():
                if int(np.prod(meta["shape"])) * np.dtype(meta["dtype"]).itemsize <= self.SMALL_ARRAY_BYTES:
                    value = arrays.read(stores[name], path=meta["path"])
                    if arrays.content_digest(value) != meta["sha256"]:
                        raise LakeError(f"lake array {meta['path']} does not match the digest in its commit "
                                        "record: the data was modified after commit")
                    self._in_memory[name] = value
        return self._stores

    def read(self, index=slice(None)) -> dict[str, np.ndarray]:
        """Reads ``index`` (int, slice or integer array) from every array of the split.

        Integer arrays are read in sorted order (TensorStore then walks each shard once; about 3x faster for random
        batches) and returned in the order asked for."""
        stores = self._open()
        inverse = None
        if isinstance(index, np.ndarray) and index.ndim == 1 and index.size > 1:
            index, inverse = np.unique(index, return_inverse=True)
        out = {name: self._in_memory[name][index] if name in self._in_memory
               else arrays.read(store, index, path=self.entry["arrays"][name]["path"])
               for name, store in stores.items()}
        return out if inverse is None else {name: value[inverse] for name, value in out.items()}

    def read_all(self, verify: bool = True) -> dict[str, np.ndarray]:
        """Reads the whole split; with ``verify`` the content digests are checked against the commit record."""
        data = self.read()
        if verify:
            for name, value in data.items():
                if arrays.content_digest(value) != self.entry["arrays"][name]["sha256"]:
                    raise LakeError(f"lake array {self.entry['arrays'][name]['path']} does not match the digest "
                                    "in its commit record: the data was modified after commit")
        return data

    def __getstate__(self):
        return {**self.__dict__, "_stores": None, "_in_memory": {}}


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
    """A directory of versioned tables. ``target_shard_bytes`` sizes the shard files of new commits."""

    def __init__(self, root: str | Path, *, target_shard_bytes: int = arrays.TARGET_SHARD_BYTES):
        self.root = Path(root)
        self.target_shard_bytes = int(target_shard_bytes)

    def tables(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / LOG_DIR).is_dir() and _NAME.match(p.name))

    def versions(self, table: str) -> list[int]:
        log = self.root / check_name("table", table) / LOG_DIR
        if not log.is_dir():
            return []
        return sorted(int(p.stem) for p in log.glob("*.json") if p.stem.isdigit())

    def table(self, table: str, version: int | None = None) -> TableVersion:
        """The committed version ``version`` of ``table`` (default: the latest)."""
        check_name("table", table)
        versions = self.versions(table)
        if not versions:
            known = ", ".join(self.tables()) or "none"
            raise LakeError(f"lake {self.root} has no table {table!r} (tables: {known}); "
                            f"create it with `lepton-jax lake ingest --lake {self.root} --table {table}`")
        version = versions[-1] if version is None else int(version)
        if version not in versions:
            raise LakeError(f"table {table!r} has no version {version}; versions: {versions}")
        path = self._record_path(table, version)
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise LakeError(f"commit record {path} is unreadable ({e}); the lake is corrupt") from e
        if record.get("format") != FORMAT or record.get("version") != version:
            raise LakeError(f"commit record {path} is not a {FORMAT} record for version {version}")
        return TableVersion(self, table, record)

    def _record_path(self, table: str, version: int) -> Path:
        return self.root / table / LOG_DIR / f"{version:08d}.json"

    # -- writing ---------------------------------------------------------------------------------------------------

    def commit(self, table: str, splits: dict[str, dict[str, np.ndarray]], *, schema: dict[str, Any],
               lineage: dict[str, Any], stats: dict[str, Any] | None = None, parent: int | None = None,
               quarantine: dict[str, Any] | None = None, retries: int = 0,
               rebase: Callable[[TableVersion], TableVersion | None] | None = None) -> TableVersion:
        """Writes ``splits`` (split -> array name -> array) as a new version and publishes it atomically.

        ``parent`` is the version this commit builds on (default: the latest when called; 0 = an empty table). If
        another writer has published ``parent + 1`` meanwhile, raises :class:`CommitConflictError` and removes the
        data it wrote — unless ``retries`` > 0: then it re-reads the latest version, asks ``rebase(latest)`` whether
        the commit is still wanted (a returned version means "no, use this one"), and publishes on top of it.

        ``quarantine`` holds the rejected examples: ``{"entries": [dict, ...], "arrays": {name: array}}``.
        """
        check_name("table", table)
        if parent is None:
            versions = self.versions(table)
            parent = versions[-1] if versions else 0
        commit_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
        commit_dir = self.root / table / DATA_DIR / commit_id
        try:
            split_entries = {split: self._write_split(table, commit_id, check_name("split", split), named)
                             for split, named in splits.items()}
            quarantine_entry = self._write_quarantine(table, commit_id, quarantine or {})
            if commit_dir.exists():
                arrays.fsync_tree(commit_dir)
                for d in (commit_dir.parent, commit_dir.parent.parent):
                    arrays.fsync_dir(d)
        except BaseException:
            shutil.rmtree(commit_dir, ignore_errors=True)
            raise
        crash_point("data")
        while True:
            version = parent + 1
            record = {"format": FORMAT, "table": table, "version": version, "parent": parent or None,
                      "commit_id": commit_id, "time": time.time(), "schema": schema, "lineage": lineage,
                      "stats": stats or {}, "splits": split_entries, "quarantine": quarantine_entry}
            if commit_dir.exists():  # a long-running commit refreshes its age so gc's grace period counts from now
                os.utime(commit_dir)
            try:
                self._publish(table, version, record)
                return TableVersion(self, table, record)
            except CommitConflictError:
                if retries <= 0:
                    shutil.rmtree(commit_dir, ignore_errors=True)
                    raise
                retries -= 1
                latest = self.table(table)
                existing = rebase(latest) if rebase is not None else None
                if existing is not None:
                    shutil.rmtree(commit_dir, ignore_errors=True)
                    return existing
                parent = latest.version

    def _write_array(self, table: str, rel: str, value: np.ndarray, first: bool) -> dict[str, Any]:
        path = self.root / table / rel
        hook = (lambda i: crash_point("shard") if i == 0 else None) if first else None
        digest = arrays.write_array(path, value, target_shard_bytes=self.target_shard_bytes, after_shard=hook)
        if first:
            crash_point("array")
        return {"path": rel, "dtype": value.dtype.name, "shape": list(value.shape), "sha256": digest,
                "files": arrays.file_digests(path)}

    def _write_split(self, table: str, commit_id: str, split: str, named: dict[str, np.ndarray]) -> dict[str, Any]:
        sizes = {name: value.shape[0] for name, value in named.items()}
        if len(set(sizes.values())) != 1:
            raise LakeError(f"split {split!r}: arrays must share their first axis, got {sizes}")
        entry: dict[str, Any] = {"num_examples": int(next(iter(sizes.values()))), "arrays": {}}
        for name, value in named.items():
            first = not (self.root / table / DATA_DIR / commit_id).exists()
            rel = f"{DATA_DIR}/{commit_id}/{split}/{check_name('array', name)}"
            entry["arrays"][name] = self._write_array(table, rel, value, first)
        return entry

    def _write_quarantine(self, table: str, commit_id: str, quarantine: dict[str, Any]) -> dict[str, Any]:
        entries = list(quarantine.get("entries", []))
        reasons: dict[str, int] = {}
        for e in entries:
            reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
        out: dict[str, Any] = {"num_examples": len(entries), "reasons": reasons}
        if not entries:
            return out
        base = self.root / table / DATA_DIR / commit_id / QUARANTINE
        base.mkdir(parents=True)
        payload = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode()
        (base / "entries.jsonl").write_bytes(payload)
        out["entries"] = {"path": f"{DATA_DIR}/{commit_id}/{QUARANTINE}/entries.jsonl",
                          "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
        named = quarantine.get("arrays") or {}
        if named and next(iter(named.values())).shape[0]:
            out["arrays"] = {name: self._write_array(table, f"{DATA_DIR}/{commit_id}/{QUARANTINE}/"
                                                     f"{check_name('array', name)}", value, False)
                             for name, value in named.items()}
            out["num_rows"] = int(next(iter(named.values())).shape[0])
        return out

    def _publish(self, table: str, version: int, record: dict[str, Any]) -> None:
        log = self.root / table / LOG_DIR
        log.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=log)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            crash_point("record")
            try:
                os.link(tmp, self._record_path(table, version))
            except FileExistsError as e:
                raise CommitConflictError(f"table {table!r} version {version} was committed by another writer; "
                                          "re-read the latest version and commit on top of it") from e
            crash_point("published")
            arrays.fsync_dir(log)
        finally:
            Path(tmp).unlink(missing_ok=True)

    # -- checking and cleaning up ------------------------------------------------------------------------------------

    def verify(self, table: str | None = None, version: int | None = None, *,
               content: bool = True) -> list[Problem]:
        """Re-checks every file digest (and, with ``content``, every array's content digest) of every version of
        ``table`` (default: all tables; ``version`` narrows to one). Returns every problem found; empty = intact."""
        problems: list[Problem] = []
        tables = [check_name("table", table)] if table else self.tables()
        if table and not self.versions(table):
            self.table(table)  # raises the 'no such table' error
        for name in tables:
            for v in ([int(version)] if version is not None else self.versions(name)):
                try:
                    tv = self.table(name, v)
                except LakeError as e:
                    problems.append(Problem(name, v, str(self._record_path(name, v)), str(e)))
                    continue
                problems += self._verify_version(tv, content)
        return problems

    def _verify_version(self, tv: TableVersion, content: bool) -> list[Problem]:
        problems: list[Problem] = []
        entries = [(split, e) for split, e in tv.record["splits"].items()]
        q = tv.record.get("quarantine") or {}
        if q.get("arrays"):
            entries.append((QUARANTINE, q))
        if q.get("entries"):
            try:
                tv.quarantine()
            except LakeError as e:
                problems.append(Problem(tv.table, tv.version, q["entries"]["path"], str(e)))
        for _, entry in entries:
            for meta in entry["arrays"].values():
                problems += self._verify_array(tv, meta, content)
        return problems

    def _verify_array(self, tv: TableVersion, meta: dict[str, Any], content: bool) -> list[Problem]:
        problems: list[Problem] = []
        try:
            path = self.root / tv.table / _safe_relpath(meta["path"])
        except LakeError as e:
            return [Problem(tv.table, tv.version, str(meta.get("path")), str(e))]

        def bad(rel: str, message: str) -> None:
            problems.append(Problem(tv.table, tv.version, f"{meta['path']}/{rel}" if rel else meta["path"], message))

        files = meta.get("files")
        if files is not None:
            for rel, info in files.items():
                file = path / rel
                if not file.is_file():
                    bad(rel, "missing file")
                elif file.stat().st_size != info["bytes"]:
                    bad(rel, f"truncated or extended: {file.stat().st_size} bytes, recorded {info['bytes']}")
                elif arrays.file_sha256(file) != info["sha256"]:
                    bad(rel, "sha256 differs from the commit record (bytes changed)")
            extra = sorted(set(arrays.file_digests(path)) - set(files)) if path.is_dir() else []
            for rel in extra:
                bad(rel, "file not listed in the commit record")
        if content and not problems:
            try:
                store = arrays.open_array(path)
                if arrays.stored_content_digest(store, path=meta["path"]) != meta["sha256"]:
                    bad("", "content digest differs from the commit record")
            except LakeError as e:
                bad("", str(e))
        return problems

    def gc(self, grace_seconds: float = 3600.0, *, table: str | None = None, dry_run: bool = False) -> GcReport:
        """Removes commit data no version record references (left by crashed or conflicting writers) and stale
        temp records, but only what is older than ``grace_seconds`` (so in-flight commits are never touched).
        Every published version stays readable."""
        report = GcReport([], 0, [])
        now = time.time()
        for name in ([check_name("table", table)] if table else self.tables()):
            base = self.root / name
            candidates = sorted((base / DATA_DIR).iterdir()) if (base / DATA_DIR).is_dir() else []
            candidates += sorted((base / LOG_DIR).glob(TEMP_PREFIX + "*"))
            live: set[str] = set()
            for v in self.versions(name):  # read after listing: a commit published meanwhile is seen as live
                live.add(self.table(name, v).record["commit_id"])
            for path in candidates:
                if path.parent.name == DATA_DIR and path.name in live:
                    continue
                rel = path.relative_to(self.root).as_posix()
                if now - _newest_mtime(path) < grace_seconds:
                    report.kept_young.append(rel)
                    continue
                size = _tree_bytes(path)
                if not dry_run:
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
                report.removed.append(rel)
                report.bytes_freed += size
        return report


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir():
        for p in path.rglob("*"):
            newest = max(newest, p.lstat().st_mtime)
    return newest


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
