"""Maintenance: compaction (rewriting fragments without changing content), verification (every digest of every
version, the log itself) and garbage collection (unreferenced data, never live or in-flight). A mixin of
:class:`~lepton_jax.lake.store.Lake`, reading and publishing through the same record format."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, NoReturn

import numpy as np

from lepton_jax.errors import CommitConflictError, LakeError
from lepton_jax.lake import arrays
from lepton_jax.lake.commit import MIN_GRACE_SECONDS
from lepton_jax.lake.faults import crash_point
from lepton_jax.lake.fragments import (
    LABEL,
    check_name,
    commit_dirs,
    content_matches,
    fragment_row_hash,
    merge_partials,
    partial_stats,
    read_row_checks,
    read_row_hashes,
    remember_keys,
    row_digests,
    safe_relpath,
    split_fragments,
    stores_row_checks,
    table_row_hash,
    write_row_checks,
    write_row_hashes,
)
from lepton_jax.lake.read import SplitReader, TableVersion
from lepton_jax.lake.records import DATA_DIR, LEASE_DIR, LOG_DIR, QUARANTINE, TEMP_PREFIX
from lepton_jax.lake.storage import Storage, storage_clock

CONTENT_DIFFERS = "content digest differs from the commit record"


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


class Maintenance:
    """Compaction, verification and gc (mixed into :class:`~lepton_jax.lake.store.Lake`)."""

    storage: Storage
    target_shard_bytes: int
    compression: str


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
                    was = old.record["splits"][split]
                    if "content_sha256" in was and not content_matches(self.storage, table, frags, was,
                                                                       label_array):
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
        stats_parts, hash_parts, check_parts, label_parts = [], [], [], []
        row_hash = table_row_hash(reader.fragments)  # the merged fragments' (one per table)
        with_checks = stores_row_checks(row_hash)
        for a in range(start, stop, block_rows):
            block = reader.read(slice(a, min(a + block_rows, stop)))
            for name, w in writers.items():
                w.write(block[name])
            stats_parts.append(partial_stats(block, label_array))
            block_hashes, block_checks = row_digests(block, label_array, row_hash=row_hash, checks=with_checks)
            hash_parts.append(block_hashes)
            check_parts.append(block_checks)
            if label_array in block:
                label_parts.append(block[label_array])
            if crash and a == start:
                crash_point("shard")
        entry: dict[str, Any] = {"path": rel, "num_examples": stop - start, "arrays": {}}
        for k, (name, w) in enumerate(writers.items()):
            entry["arrays"][name] = {"path": f"{rel}/{name}", "dtype": metas[name]["dtype"],
                                     "shape": [stop - start, *metas[name]["shape"][1:]], "sha256": w.close(),
                                     "files": arrays.file_digests(self.storage, f"{base}/{name}")}
            if crash and k == 0:
                crash_point("array")
        hashes = np.concatenate(hash_parts)
        entry["row_hashes"] = write_row_hashes(self.storage, table, rel, hashes, row_hash)
        if with_checks:
            entry["row_checks"] = write_row_checks(self.storage, table, rel, np.concatenate(check_parts))
        # the content check and the record's content chain then read nothing of the new fragment back
        remember_keys(self.storage, table, entry, label_array, hashes,
                      np.concatenate(label_parts) if label_parts else None)
        entry["stats"] = merge_partials(stats_parts)
        return entry


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
        try:  # dedup compares row hashes across fragments: a version's fragments share one
            table_row_hash(f for _, frags in groups for f in frags)
        except LakeError as e:
            problems.append(Problem(tv.table, tv.version, str(self._record_path(tv.table, tv.version)), str(e)))
        for split, frags in groups:
            bad_before = len(problems)
            for frag in frags:
                if frag["path"] not in checked:
                    found = [p for meta in frag["arrays"].values() for p in self._verify_array(tv, meta, content)]
                    # the rows are re-hashed unless a file is already bad (a shard replaced by another valid one
                    # only changes the content: its rows then name it)
                    found += self._verify_row_hashes(tv, frag, label_array,
                                                     content and all(p.message == CONTENT_DIFFERS for p in found))
                    checked[frag["path"]] = [(p.path, p.message) for p in found]
                problems += [Problem(tv.table, tv.version, path, msg) for path, msg in checked[frag["path"]]]
            entry = tv.record["splits"].get(split, {}) if split != QUARANTINE else {}
            if content and entry.get("content_sha256") and len(problems) == bad_before:
                try:
                    if not content_matches(self.storage, tv.table, frags, entry, label_array):
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
            row_hash = fragment_row_hash(frag)
            stored = read_row_hashes(self.storage, tv.table, frag, label_array)
        except LakeError as e:
            return [Problem(tv.table, tv.version, meta["path"], str(e))]
        checks_path = (frag.get("row_checks") or {}).get("path", meta["path"])
        try:
            checks = read_row_checks(self.storage, tv.table, frag)
        except LakeError as e:
            return [Problem(tv.table, tv.version, checks_path, str(e))]
        if recompute:  # block by block: bounded memory however large the fragment; TensorStore checks each chunk's
            # crc32c, and the rows are compared here (not through a reader, which would stop at the first bad row)
            try:
                stores = {name: (arrays.open_array(self.storage, f"{tv.table}/{safe_relpath(m['path'])}",
                                                   8 * 2**20), m["path"]) for name, m in frag["arrays"].items()}
            except LakeError as e:
                return [Problem(tv.table, tv.version, meta["path"], str(e))]
            row_bytes = sum(int(np.prod(m["shape"][1:])) * np.dtype(m["dtype"]).itemsize
                            for m in frag["arrays"].values())
            rows = max(1, 16 * 2**20 // max(1, row_bytes))
            total = int(next(iter(frag["arrays"].values()))["shape"][0])
            start = 0
            for start in range(0, total, rows):
                part = slice(start, min(start + rows, total))
                try:
                    block = {name: arrays.read(st, part, path=path) for name, (st, path) in stores.items()}
                except LakeError as e:
                    return [Problem(tv.table, tv.version, meta["path"], str(e))]
                n = part.stop - part.start
                hashes, block_checks = row_digests(block, label_array, checks=checks is not None, row_hash=row_hash)
                differ = np.flatnonzero((hashes != stored[start:start + n]).any(axis=1))
                if differ.size:
                    return [Problem(tv.table, tv.version, meta["path"], "row hashes differ from the fragment's data"),
                            *self._shards_of_rows(tv, frag, label_array, start + differ)]
                if checks is not None and np.any(block_checks != checks[start:start + n]):
                    return [Problem(tv.table, tv.version, checks_path, "row checks differ from the fragment's data")]
            start = total
            if start != stored.shape[0]:
                return [Problem(tv.table, tv.version, meta["path"], f"{stored.shape[0]} row hashes for {start} rows")]
        return []

    def _shards_of_rows(self, tv: TableVersion, frag: dict[str, Any], label_array: str,
                        rows: np.ndarray) -> list[Problem]:
        """The shard files (of the fragment's non-label arrays) that hold ``rows``, which differ from their row
        hashes: named, since a shard replaced by another valid one passes its own crc32c."""
        out = []
        for name, meta in frag["arrays"].items():
            if name == label_array:
                continue
            key = f"{tv.table}/{safe_relpath(meta['path'])}"
            try:
                zarr_meta = json.loads(self.storage.read(f"{key}/zarr.json"))
                per_shard = int(zarr_meta["chunk_grid"]["configuration"]["chunk_shape"][0])
                separator = arrays.key_separator(zarr_meta) or "/"
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            out += [Problem(tv.table, tv.version,
                            f"{meta['path']}/{arrays.shard_file(s, len(meta['shape']), separator)}",
                            "holds rows that differ from their row hashes (bytes changed)")
                    for s in sorted({int(r) // per_shard for r in rows})]
        return out

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
            zarr_meta: dict[str, Any] | None = None
            for rel, info in files.items():
                if rel not in found:
                    bad(rel, "missing file")
                elif found[rel][0] != info["bytes"]:
                    bad(rel, f"truncated or extended: {found[rel][0]} bytes, recorded {info['bytes']}")
                elif "sha256" in info:
                    if self.storage.sha256(f"{key}/{rel}") != info["sha256"]:
                        bad(rel, "sha256 differs from the commit record (bytes changed)")
                elif arrays.is_shard_file(rel) and (content or self.storage.local_path(key) is not None):
                    # a shard file: checked by its own crc32c (index and inner chunks); `verify --files-only` on an
                    # object store checks sizes only (no download)
                    try:
                        if zarr_meta is None:
                            zarr_meta = json.loads(self.storage.read(f"{key}/zarr.json"))
                        problem = arrays.shard_file_problem(self.storage.read(f"{key}/{rel}"), zarr_meta)
                    except (OSError, ValueError, KeyError, StopIteration, TypeError) as e:
                        problem = f"unreadable ({e})"
                    if problem is not None:
                        bad(rel, problem)
            for rel in sorted(set(found) - set(files)):
                bad(rel, "file not listed in the commit record")
        if content and not problems:
            try:
                store = arrays.open_array(self.storage, key)
                if arrays.stored_content_digest(store, path=meta["path"]) != meta["sha256"]:
                    bad("", CONTENT_DIFFERS)
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
