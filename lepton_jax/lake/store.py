"""Lake tables, versions and atomic commits.

Layout of a lake rooted at ``ROOT``::

    ROOT/<table>/_log/00000001.json       one commit record per version (append-only)
    ROOT/<table>/data/<commit-id>/<split>/<array>/   zarr v3 arrays, written once

A commit writes its arrays under a fresh ``data/<commit-id>/`` and then publishes the record with ``os.link`` from a
fsynced temp file, an exclusive create: if another writer already published that version, the link fails and this
writer gets a :class:`CommitConflictError` instead of overwriting it. Readers list ``_log`` and see only whole
versions; a crash before the link leaves the previous version as the latest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from lepton_jax.errors import CommitConflictError, LakeError
from lepton_jax.lake import arrays

FORMAT = "lepton-lake/1"
LOG_DIR = "_log"
DATA_DIR = "data"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def check_name(kind: str, name: str) -> str:
    """Table, split and array names become path components: no separators, no ``..``."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise LakeError(f"invalid {kind} name {name!r}: use letters, digits, '_', '-', '.' "
                        "(no path separators, no '..')")
    return name


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

    def reader(self, split: str) -> SplitReader:
        return SplitReader(self.lake.root, self.table, self.version, split, self._split(split))

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.record["splits"]:
            raise LakeError(f"table {self.table!r} version {self.version} has no split {split!r}; "
                            f"it has {', '.join(self.record['splits'])}")
        return self.record["splits"][split]


class SplitReader:
    """Random access to one split of a pinned table version. Picklable; opens TensorStore lazily."""

    def __init__(self, root: Path, table: str, version: int, split: str, entry: dict[str, Any]):
        self.root, self.table, self.version, self.split = Path(root), table, version, split
        self.entry = entry
        self._stores: dict[str, Any] | None = None

    def __len__(self) -> int:
        return int(self.entry["num_examples"])

    @property
    def array_names(self) -> list[str]:
        return list(self.entry["arrays"])

    def _open(self) -> dict[str, Any]:
        if self._stores is None:
            stores = {}
            for name, meta in self.entry["arrays"].items():
                store = arrays.open_array(self.root / self.table / meta["path"])
                if list(store.shape) != list(meta["shape"]) or store.dtype.numpy_dtype != np.dtype(meta["dtype"]):
                    raise LakeError(f"lake array {meta['path']} has shape {list(store.shape)} "
                                    f"{store.dtype.numpy_dtype}, but its commit record says {meta['shape']} "
                                    f"{meta['dtype']}")
                stores[name] = store
            self._stores = stores
        return self._stores

    def read(self, index=slice(None)) -> dict[str, np.ndarray]:
        """Reads ``index`` (int, slice or integer array) from every array of the split."""
        stores = self._open()
        return {name: arrays.read(store, index, path=self.entry["arrays"][name]["path"])
                for name, store in stores.items()}

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
        return {**self.__dict__, "_stores": None}


class Lake:
    """A directory of versioned tables."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

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

    def commit(self, table: str, splits: dict[str, dict[str, np.ndarray]], *, schema: dict[str, Any],
               lineage: dict[str, Any], stats: dict[str, Any] | None = None,
               parent: int | None = None) -> TableVersion:
        """Writes ``splits`` (split -> array name -> array) as a new version and publishes it atomically.

        ``parent`` is the version this commit builds on (default: the latest when called; 0 = an empty table). If
        another writer has published ``parent + 1`` meanwhile, raises :class:`CommitConflictError` and leaves no
        record behind.
        """
        check_name("table", table)
        if parent is None:
            versions = self.versions(table)
            parent = versions[-1] if versions else 0
        version = parent + 1
        commit_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
        split_entries = {}
        for split, named in splits.items():
            check_name("split", split)
            sizes = {name: value.shape[0] for name, value in named.items()}
            if len(set(sizes.values())) != 1:
                raise LakeError(f"split {split!r}: arrays must share their first axis, got {sizes}")
            entry = {"num_examples": int(next(iter(sizes.values()))), "arrays": {}}
            for name, value in named.items():
                rel = f"{DATA_DIR}/{commit_id}/{split}/{check_name('array', name)}"
                digest = arrays.write_array(self.root / table / rel, value)
                entry["arrays"][name] = {"path": rel, "dtype": value.dtype.name, "shape": list(value.shape),
                                         "sha256": digest}
            split_entries[split] = entry
        record = {"format": FORMAT, "table": table, "version": version, "parent": parent or None,
                  "commit_id": commit_id, "time": time.time(), "schema": schema, "lineage": lineage,
                  "stats": stats or {}, "splits": split_entries}
        self._publish(table, version, record)
        return TableVersion(self, table, record)

    def _publish(self, table: str, version: int, record: dict[str, Any]) -> None:
        log = self.root / table / LOG_DIR
        log.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".commit-", dir=log)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self._record_path(table, version))
            except FileExistsError as e:
                raise CommitConflictError(f"table {table!r} version {version} was committed by another writer; "
                                          "re-read the latest version and commit on top of it") from e
            dir_fd = os.open(log, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            Path(tmp).unlink(missing_ok=True)
