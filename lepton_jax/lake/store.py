"""Lake tables, versions, atomic commits, verification and garbage collection.

Layout of a lake rooted at ``ROOT``::

    ROOT/<table>/_log/00000001.json                        one commit record per version (append-only)
    ROOT/<table>/data/<commit-id>/<split>/<frag>/<array>/  a fragment's zarr v3 arrays, written once
    ROOT/<table>/data/<commit-id>/<split>/<frag>/_rows.<hash>   its row hashes (32 bytes per row; xxh3_128 or sha256)
    ROOT/<table>/data/<commit-id>/<split>/<frag>/_rows.xxh3     sha256 tables: row checks, what reads compare (8 B/row)
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

The code is split by concept around the record format (:mod:`lepton_jax.lake.records`): reading
(:mod:`~lepton_jax.lake.read`: :class:`TableVersion`, :class:`SplitReader`), committing (:mod:`~lepton_jax.lake.commit`:
fragments, records, publish, leases) and maintenance (:mod:`~lepton_jax.lake.maintenance`: compact, verify, gc);
:class:`Lake` here holds the lake's location and its tables' logs and mixes in the other two.
"""

from __future__ import annotations

from pathlib import Path

from lepton_jax.errors import LakeError
from lepton_jax.lake import arrays, records
from lepton_jax.lake.commit import LEASE_HEARTBEAT_SECONDS, MIN_GRACE_SECONDS, Committing
from lepton_jax.lake.fragments import _NAME, check_name
from lepton_jax.lake.maintenance import GcReport, Maintenance, Problem
from lepton_jax.lake.read import SplitReader, TableVersion
from lepton_jax.lake.records import DATA_DIR, FORMAT, LEASE_DIR, LOG_DIR, QUARANTINE, TEMP_PREFIX, USED_DIR
from lepton_jax.lake.storage import open_storage

OBJECT_STORE_COMPRESSION = "zstd"  # the default layout of new arrays in a lake on S3/GCS (Lake's docstring)

__all__ = ["DATA_DIR", "FORMAT", "LEASE_DIR", "LEASE_HEARTBEAT_SECONDS", "MIN_GRACE_SECONDS", "QUARANTINE",
           "TEMP_PREFIX", "USED_DIR", "GcReport", "Lake", "Problem", "SplitReader", "TableVersion", "check_name"]


class Lake(Committing, Maintenance):
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
