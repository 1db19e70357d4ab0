"""Committing: writing a commit's fragments, publishing its record by an atomic create-if-absent (with the
used-version markers that keep version numbers from being reused), and the lease that keeps gc off a commit in
flight. A mixin of :class:`~lepton_jax.lake.store.Lake`, around the record format of :mod:`lepton_jax.lake.records`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from lepton_jax.errors import CommitConflictError, LakeError
from lepton_jax.lake import records
from lepton_jax.lake.faults import crash_point
from lepton_jax.lake.fragments import (
    DEFAULT_ROW_HASH,
    LABEL,
    check_name,
    content_chain,
    logical_arrays,
    safe_relpath,
    split_fragments,
    write_fragment,
)
from lepton_jax.lake.processes import pid_alive as _pid_alive
from lepton_jax.lake.processes import pid_namespace as _pid_namespace
from lepton_jax.lake.processes import process_start as _process_start
from lepton_jax.lake.read import TableVersion
from lepton_jax.lake.records import DATA_DIR, LEASE_DIR, LOG_DIR, QUARANTINE, TEMP_PREFIX, USED_DIR
from lepton_jax.lake.storage import Storage

if TYPE_CHECKING:
    from lepton_jax.lake.storage import Storage

log = logging.getLogger(__name__)
MIN_GRACE_SECONDS = 60.0  # gc's smallest grace period without force=True
LEASE_HEARTBEAT_SECONDS = MIN_GRACE_SECONDS / 4  # a held lease is rewritten at least this often
LEASE_TOUCH_SECONDS = 1.0  # touch() rewrites the lease at most this often (the heartbeat renews it anyway)


class Committing:
    """Writing and publishing versions, and leases (mixed into :class:`~lepton_jax.lake.store.Lake`)."""

    storage: Storage
    target_shard_bytes: int
    compression: str


    @staticmethod
    def new_commit_id() -> str:
        """A fresh, unique directory name for a commit's data."""
        return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"

    def write_fragment(self, table: str, rel: str, named: dict[str, np.ndarray], *, label_array: str = LABEL,
                       crash: bool = False, hashes: np.ndarray | Callable[[], np.ndarray] | None = None,
                       checks: np.ndarray | Callable[[], np.ndarray] | None = None, row_hash: str
                       ) -> dict[str, Any]:
        """Writes one fragment at ``<table>/<rel>`` (``rel`` = ``data/<commit-id>/...``) with the table's
        ``row_hash``; returns its entry."""
        safe_relpath(rel)
        for part in rel.split("/")[1:]:
            check_name("fragment path component", part)
        return write_fragment(self.storage, check_name("table", table), rel, named,
                              target_shard_bytes=self.target_shard_bytes, label_array=label_array, crash=crash,
                              hashes=hashes, checks=checks, compression=self.compression, row_hash=row_hash)

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

    def split_entry(self, table: str, fragments: list[dict[str, Any]], label_array: str = LABEL,
                    extends: dict[str, Any] | None = None) -> dict[str, Any]:
        """A split's record entry from its fragments: example count, logical arrays, logical content digest (its
        chain continued from the split entry ``extends`` when the fragments begin with that entry's)."""
        if not fragments:
            raise LakeError("a split needs at least one fragment")
        return {"num_examples": sum(int(f["num_examples"]) for f in fragments),
                "arrays": logical_arrays(fragments),
                **content_chain(self.storage, table, fragments, label_array, extends),
                "fragments": fragments}

    def publish(self, table: str, commit_id: str, *, splits: dict[str, list[dict[str, Any]]],
                schema: dict[str, Any], lineage: dict[str, Any], stats: dict[str, Any] | None = None,
                quarantine: dict[str, Any] | None = None, parent: int | None = None, retries: int = 0,
                rebase: Callable[[TableVersion], TableVersion | None] | None = None,
                keep_on_conflict: bool = False, extends: TableVersion | None = None) -> TableVersion:
        """Publishes a version whose splits are the given fragments (new ones under ``data/<commit_id>/``, and any
        fragments of earlier versions, which are shared, not copied).

        ``parent`` is the version this commit builds on (default: the latest when called; 0 = an empty table). If
        another writer has published ``parent + 1`` meanwhile, raises :class:`CommitConflictError` and removes the
        data it wrote — unless ``retries`` > 0: then it re-reads the latest version, asks ``rebase(latest)`` whether
        the commit is still wanted (a returned version means "no, use this one"), and publishes on top of it.
        ``keep_on_conflict`` leaves the data in place on a conflict (the caller rebuilds the record and retries).
        ``extends``: a version whose splits these splits continue (an append): their content chains go on from its
        record instead of reading its rows.
        """
        check_name("table", table)
        if parent is None:
            versions = self.versions(table)
            parent = versions[-1] if versions else 0
        commit_dir = f"{table}/{DATA_DIR}/{commit_id}"
        label_array = schema.get("label_array", LABEL)
        try:
            prior = extends.record["splits"] if extends is not None else {}
            split_entries = {check_name("split", split): self.split_entry(table, frags, label_array,
                                                                          prior.get(split))
                             for split, frags in splits.items()}
            # local: fsync the directory entries of the tree outside its arrays, up to the root (every file in it
            # was made durable as it was written: arrays, files and directories, when complete; row hashes and
            # quarantine lists by Storage.write); object stores: nothing
            self.storage.sync(commit_dir, files=False)
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
            for side in ("row_hashes", "row_checks"):
                if frag.get(side):
                    files.append((frag[side]["path"], int(frag[side]["bytes"])))
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
               rebase: Callable[[TableVersion], TableVersion | None] | None = None,
               row_hash: str | None = None) -> TableVersion:
        """Writes ``splits`` (split -> array name -> array), one fragment each, as a new version and publishes it
        atomically (see :meth:`publish` for ``parent``, ``retries`` and ``rebase``); ``row_hash`` names the rows'
        identity hash (:data:`~lepton_jax.lake.fragments.ROW_HASHES`; default: the table's latest version's, or
        ``xxh3_128`` for a new table).

        ``quarantine`` holds the rejected examples: ``{"entries": [dict, ...], "arrays": {name: array}}``.
        """
        check_name("table", table)
        if row_hash is None:
            latest = self.table(table) if self.versions(table) else None
            row_hash = latest.row_hash if latest is not None else DEFAULT_ROW_HASH
        commit_id = self.new_commit_id()
        commit_dir = f"{table}/{DATA_DIR}/{commit_id}"
        label_array = schema.get("label_array", LABEL)
        with self.lease(table, commit_id):
            try:
                fragments = {}
                for k, (split, named) in enumerate(splits.items()):
                    rel = f"{DATA_DIR}/{commit_id}/{check_name('split', split)}/00000"
                    fragments[split] = [self.write_fragment(table, rel, named, label_array=label_array, crash=k == 0,
                                                            row_hash=row_hash)]
                q = quarantine or {}
                q_entry = self.write_quarantine_entries(table, commit_id, list(q.get("entries", [])))
                named = q.get("arrays") or {}
                if named and next(iter(named.values())).shape[0]:
                    q_entry["fragments"] = [self.write_fragment(table, f"{DATA_DIR}/{commit_id}/{QUARANTINE}/00000",
                                                                named, label_array=label_array, row_hash=row_hash)]
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
        # the directories above the log need no sync here: the commit synced its data directory's path up to the
        # root before publishing (the table's entry in the root included), and creating _log or _log/_used syncs
        # the directory it was created in
        try:  # the record is published: a failure from here on must not make the caller discard its data
            self._mark_used(table, version)
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
        rewritten, so its last-modified time is now) unless it was renewed within :data:`LEASE_TOUCH_SECONDS`; a
        heartbeat thread also renews it every :data:`LEASE_HEARTBEAT_SECONDS`. Take it before creating the
        directory."""
        key = f"{check_name('table', table)}/{LEASE_DIR}/{commit_id}.json"
        info = {"commit_id": commit_id, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": _process_start(os.getpid()), "pid_namespace": _pid_namespace(), "time": time.time()}

        def put() -> None:
            for attempt in range(20):  # another writer's removal of an empty local _leases/ may race this write
                try:
                    # not fsynced: a lease only matters while its writer lives (a crash of the machine ends both)
                    self.storage.write(key, json.dumps({**info, "time": time.time()}).encode(), durable=False)
                    renewed[0] = time.monotonic()
                    return
                except FileNotFoundError:
                    if attempt == 19:
                        raise

        renewed = [0.0]  # when put() last wrote the lease (time.monotonic())

        def touch() -> None:
            if time.monotonic() - renewed[0] >= LEASE_TOUCH_SECONDS:
                put()

        put()
        stop = threading.Event()

        def heartbeat() -> None:  # renews the lease through phases that do not call touch() (hashing, commit)
            while not stop.wait(LEASE_HEARTBEAT_SECONDS):
                with contextlib.suppress(OSError, LakeError):
                    put()

        beat = threading.Thread(target=heartbeat, name=f"lease-{commit_id}", daemon=True)
        beat.start()
        try:
            yield touch
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
