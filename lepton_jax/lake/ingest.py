"""Ingest: stream a source chunk by chunk → validate → label → clean → split → write fragments → one commit.

Every example either lands in exactly one split or in the version's quarantine with a reason — never silently
dropped. Reasons: ``unreadable``/``not_an_image``/``bit_depth``/``shape``/``mixed_labels``/``malformed_row`` (from
the source), ``unlabelled`` and ``label_domain`` (labelling), ``non_finite``, ``out_of_range``, ``duplicate`` (same
content and label as a kept example, or as an example the table already holds), ``conflicting_labels`` (same content,
different labels: every copy this ingest holds is quarantined) and ``leak`` (same content as an example in another
split). Re-ingesting identical source content with identical parameters creates no new version.

Memory stays bounded: chunks are processed one at a time per worker (``workers`` processes, or Ray tasks on a
cluster with ``executor="ray"``; chunk order preserved),
the exact dedup / leak check across chunks and against the table uses an on-disk hash index, and statistics combine
per-fragment partial sums. ``mode="append"`` adds fragments to the latest version's and shares the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from typing import Any

import numpy as np

from lepton_jax.errors import CommitConflictError, LakeError
from lepton_jax.lake.chunks import ChunkJob, LabelFn, process_chunk, stratified_split, warm_up
from lepton_jax.lake.faults import crash_point
from lepton_jax.lake.fragments import (
    LABEL,
    combine_stats,
    fragment_keys,
    fragment_row_keys,
    legacy_partials,
    read_ahead,
    read_row_hashes,
)
from lepton_jax.lake.index import CONFLICT, NEW, TABLE, HashIndex
from lepton_jax.lake.processes import die_with, process_start
from lepton_jax.lake.sources import DIGEST_OF_ROWS, Source, check_source, source_tasks
from lepton_jax.lake.store import DATA_DIR, LEASE_DIR, QUARANTINE, Lake, SplitReader, TableVersion, check_name

DEFAULT_SPLITS = {"train": 0.7, "dev": 0.15, "test": 0.15}
MODES = ("overwrite", "append")
EXECUTORS = ("process", "ray")
WORKER_PRELOAD = ["lepton_jax.lake.chunks", "PIL.Image", "PIL.JpegImagePlugin", "PIL.PngImagePlugin"]
CHUNKS_AHEAD = 1  # one worker: chunks submitted to its thread beyond the one being decided (each holds a chunk)

__all__ = ["DEFAULT_SPLITS", "IngestResult", "LabelFn", "ingest", "stratified_split"]


@dataclasses.dataclass
class IngestResult:
    version: TableVersion
    created: bool  # False when the identical source was already the latest version (or an append added nothing)
    report: dict[str, Any]
    ran_on: dict[str, Any] | None = None  # executor="ray": the cluster, and each chunk task's node and process


def ingest(lake: Lake, table: str, source: Source, *, splits: dict[str, float] | None = None, seed: int = 0,
           label_map: dict[str, str] | None = None, labeller: LabelFn | None = None,
           label_names: list[str] | None = None, retries: int = 0, allow_schema_change: bool = False,
           mode: str = "overwrite", workers: int | None = None, executor: str = "process",
           ray_address: str | None = None, progress: bool = False) -> IngestResult:
    """Reads ``source`` into a new version of ``table`` (or returns the latest if it holds the same content).

    ``mode="overwrite"``: the new version holds exactly this source. ``mode="append"``: it holds the latest
    version's fragments (shared, not copied) plus this source's examples that the table does not hold yet.
    Labels come from the source, or from ``label_map`` (source label name -> label name; unmapped examples are
    quarantined) or a ``labeller`` function. ``label_names`` fixes the label domain (default: the names seen; an
    append uses the table's). ``retries`` > 0 makes a commit that loses a race with another writer re-check and
    commit on top of the winner. A table's array dtypes and example shapes may only change with
    ``allow_schema_change`` (never in an append). ``workers`` > 1 decodes and writes chunks in that many processes.
    ``executor="ray"`` runs each chunk as a Ray task instead (``workers`` then caps the tasks in flight, default
    twice the cluster's CPUs) on the cluster at ``ray_address`` (else ``RAY_ADDRESS``), or on a local Ray instance
    started and stopped here; the tasks write fragments straight into the lake, this process decides across chunks
    and commits, exactly as with processes.
    """
    if label_map is not None and labeller is not None:
        raise LakeError("give either a label map or a labelling function, not both")
    if mode not in MODES:
        raise LakeError(f"ingest mode must be one of {', '.join(MODES)}, got {mode!r}")
    if workers is not None and workers < 1:
        raise LakeError(f"--workers must be at least 1, got {workers}")
    if executor not in EXECUTORS:
        raise LakeError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if ray_address is not None and executor != "ray":
        raise LakeError("--ray-address needs --executor ray")
    if executor == "ray":
        from lepton_jax.lake.ray_executor import import_ray

        import_ray(ray_address)  # a missing Ray is one line before anything is written
    check_name("table", table)
    source = check_source(source)
    base = lake.table(table) if lake.versions(table) else None
    appending = mode == "append" and base is not None
    if appending:
        if allow_schema_change:
            raise LakeError("an append cannot change the table's schema; ingest with --mode overwrite instead")
        label_names = list(label_names) if label_names is not None else base.label_names
        if label_names != base.label_names:
            raise LakeError(f"an append must keep the table's label names {base.label_names}, got {label_names}")
    pool = None
    if executor == "process" and (workers or 1) > 1:
        # started now, so the workers' start-up overlaps listing the source; it also reads an image folder's
        # headers in parallel
        pool = _worker_pool(workers)
        for _ in range(workers):
            pool.submit(warm_up)
    try:
        return _ingest(lake, table, source, pool, splits=splits, seed=seed, label_map=label_map, labeller=labeller,
                       label_names=label_names, retries=retries, allow_schema_change=allow_schema_change,
                       appending=appending, base=base, workers=workers, executor=executor, ray_address=ray_address,
                       progress=progress)
    except BrokenProcessPool as e:
        raise LakeError(f"an ingest worker process died (killed, or out of memory?) while reading {source.uri}; "
                        "nothing was committed") from e
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _worker_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` processes forked from a fork server that has imported the chunk code (and Pillow's common
    plugins) once: each worker starts without importing the lake again. Never forked from the caller, which may
    hold JAX/TensorStore threads a forked child would inherit broken: the fork server is a fresh interpreter, and
    those imports start no threads but OpenBLAS's, which is fork-safe."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    # workers end when this process does, even by SIGKILL (then the fork server and resource tracker, whose pipes
    # the workers held open, end too)
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=die_with,
                               initargs=(os.getpid(), process_start(os.getpid())))


def _ingest(lake: Lake, table: str, source: Source, pool: ProcessPoolExecutor | None, *,
            splits: dict[str, float] | None, seed: int, label_map: dict[str, str] | None, labeller: LabelFn | None,
            label_names: list[str] | None, retries: int, allow_schema_change: bool, appending: bool,
            base: TableVersion | None, workers: int | None, executor: str, ray_address: str | None,
            progress: bool) -> IngestResult:
    tasks = list(source_tasks(source, pool.map if pool is not None else None))
    if labeller is not None and label_names is None and len(tasks) > 1:
        raise LakeError(f"source {source.uri} comes in {len(tasks)} chunks: a labelling function needs the label "
                        "names up front (label_names=[...])")
    split_params: dict[str, Any] = {"fractions": dict(splits or DEFAULT_SPLITS), "seed": int(seed),
                                    "stratified_by": "label", "per": "chunk",
                                    "method": "sklearn.train_test_split" if len(tasks) == 1 else "stratified_counts"}
    fractions = split_params["fractions"]
    if not np.isclose(sum(fractions.values()), 1.0) or any(f <= 0 for f in fractions.values()):
        raise LakeError(f"split fractions must be positive and sum to 1, got {fractions}")
    for name in fractions:
        check_name("split", name)
    labeller_spec = _labeller_spec(label_map, labeller, label_names)
    ran_on: dict[str, Any] = {}
    commit_id = lake.new_commit_id()
    # the lake's URI, not a path of this machine: the jobs may run on other nodes
    jobs = [ChunkJob(task, k, lake.uri, table, commit_id, lake.target_shard_bytes, fractions, int(seed),
                     label_map, labeller, label_names, crash=k == 0, single=len(tasks) == 1,
                     compression=lake.compression)
            for k, task in enumerate(tasks)]
    try:
        # the lease keeps gc off this commit's data until it is published (or given up)
        with lake.lease(table, commit_id) as renew_lease:
            commit_dir = lake.storage.local_path(f"{table}/{DATA_DIR}/{commit_id}")
            if commit_dir is not None:
                commit_dir.mkdir(parents=True)
            # on a local lake the index lives in the commit's own directory: removed when the ingest ends, and a
            # SIGKILLed ingest's index is collected with the rest of its data by gc; on an object store it is a
            # local temp directory
            with HashIndex(commit_dir) as index:
                if appending:
                    _index_table(index, base)
                state = _Driver(lake, table, commit_id, index, base if appending else None)
                # closed before the data is discarded on a failure: no worker may still write into it then
                with closing(_run(jobs, workers, progress, source.uri, executor, ray_address, ran_on,
                                  pool)) as results:
                    for result in results:
                        state.add(result)
                        renew_lease()
                plan = state.finish()
            result = _commit(lake, table, source, plan, base, appending, split_params, labeller_spec, retries,
                             allow_schema_change)
    except BaseException:
        _discard(lake, table, commit_id)
        raise
    crash_point("committed")
    if ran_on:
        result.ran_on = ran_on
    return result


def _discard(lake: Lake, table: str, commit_id: str) -> None:
    """Removes a failed ingest's data, and the table's directories if that leaves them empty (a failed first
    ingest writes nothing) — unless its record was published before the failure (e.g. Ctrl-C right after it)."""
    if lake.is_published(table, commit_id):
        return
    lake._discard(f"{table}/{DATA_DIR}/{commit_id}")
    lake.storage.prune(f"{table}/{DATA_DIR}", f"{table}/{LEASE_DIR}", table)


def _commit(lake: Lake, table: str, source: Source, plan: dict[str, Any], base: TableVersion | None,
            appending: bool, split_params: dict[str, Any], labeller_spec: Any, retries: int,
            allow_schema_change: bool) -> IngestResult:
    commit_id, cleaning = plan["commit_id"], plan["cleaning"]
    if plan["source_split"]:
        split_params = {"from_source": True}
    rebased_onto: list[TableVersion] = []

    def same_ingest(latest: TableVersion) -> TableVersion | None:
        old = latest.record["lineage"]
        holds_only_its_source = old.get("mode", "overwrite") == "overwrite"  # not an append (or its compaction)
        same = (not appending and holds_only_its_source and old["source"]["sha256"] == plan["digest"]
                and old["split"] == split_params
                and old.get("labeller", "source labels") == labeller_spec)
        if same:
            rebased_onto.append(latest)
            return latest
        if latest is not base and not allow_schema_change:  # a racing writer won: re-check against its version
            _check_schema_unchanged(latest, plan["schema"])
        return None

    if base is not None and same_ingest(base):
        _discard(lake, table, commit_id)
        return IngestResult(base, created=False, report=base.record["stats"].get("cleaning", {}))
    if appending and not plan["fragments"]:
        _discard(lake, table, commit_id)
        if cleaning["quarantined"] and set(cleaning) - _COUNT_KEYS <= {"duplicate", "conflicting_labels", "leak"}:
            return IngestResult(base, created=False, report=cleaning)  # the table holds all of it already
    if plan["kept"] == 0 and not (appending and plan["fragments"]):
        raise LakeError(f"source {plan['uri']}: every example was rejected "
                        f"({ {k: v for k, v in cleaning.items() if k not in _COUNT_KEYS} }); nothing to commit")
    schema = plan["schema"]
    if base is not None and not allow_schema_change:
        _check_schema_unchanged(base, schema)
    if appending:  # the appended version's declared ranges cover the old data and the new
        for name, meta in schema["arrays"].items():
            old = base.schema["arrays"][name]["value_range"]
            meta["value_range"] = [min(old[0], meta["value_range"][0]), max(old[1], meta["value_range"][1])]
            old_cols = base.schema["arrays"][name].get("column_ranges")
            if ("column_ranges" in meta) != (old_cols is not None):
                raise LakeError(f"an append must keep how array {name!r} is scaled: the table has "
                                f"{'per-column' if old_cols is not None else 'one'} value range(s), this source "
                                f"{'per-column' if 'column_ranges' in meta else 'one'}")
            if old_cols is not None:
                meta["column_ranges"] = [[min(a[0], b[0]), max(a[1], b[1])]
                                         for a, b in zip(old_cols, meta["column_ranges"], strict=True)]
    transforms = [*plan["transforms"],
                  {"name": "drop_non_finite", "dropped": cleaning.get("non_finite", 0)},
                  {"name": "check_value_range", "dropped": cleaning.get("out_of_range", 0),
                   "ranges": {k: v["value_range"] for k, v in schema["arrays"].items()},
                   **({"column_ranges": {k: v["column_ranges"] for k, v in schema["arrays"].items()
                                         if "column_ranges" in v}}
                      if any("column_ranges" in v for v in schema["arrays"].values()) else {})},
                  {"name": "dedup_exact", "key": "sha256(example)", "index": "on-disk, whole dataset" +
                   (" and table" if appending else ""),
                   "dropped": cleaning.get("duplicate", 0) + cleaning.get("conflicting_labels", 0)},
                  {"name": "no_cross_split_leak", "key": "sha256(example)", "dropped": cleaning.get("leak", 0)}]
    lineage = {"source": {"name": source.name, "uri": plan["uri"], "sha256": plan["digest"],
                          "digest": DIGEST_OF_ROWS, "chunks": plan["chunks"]},
               "transforms": transforms, "labeller": labeller_spec, "split": split_params,
               "mode": "append" if appending else "overwrite"}
    if appending:
        lineage["appended_to"] = base.version

    def assemble(on: TableVersion | None) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        frags: dict[str, list[dict[str, Any]]] = {}
        for s in on.splits if on else []:  # version-1 fragments get their statistics partials in the new record
            frags[s] = [f if "stats" in f else {**f, "stats": _partials(on, s, f)} for f in on.fragments(s)]
        for split, new in plan["fragments"].items():
            frags.setdefault(split, []).extend(new)
        num_classes = len(schema["label_names"])
        stats = {"cleaning": cleaning,
                 "splits": {s: combine_stats([_partials(on, s, f) for f in fs], num_classes)
                            for s, fs in frags.items()}}
        return frags, stats

    on = base if appending else None
    while True:
        frags, stats = assemble(on)
        try:
            version = lake.publish(table, commit_id, splits=frags, schema=schema, lineage=lineage, stats=stats,
                                   quarantine=plan["quarantine"], parent=on.version if on else
                                   (base.version if base else 0), retries=0 if appending else retries,
                                   rebase=same_ingest, keep_on_conflict=appending, extends=on)
            break
        except CommitConflictError:
            if not appending or retries <= 0:
                raise
            retries -= 1
            latest = lake.table(table)
            _check_no_overlap(lake, table, latest, on, plan)
            on = latest
    created = not rebased_onto
    return IngestResult(version, created=created,
                        report=cleaning if created else version.record["stats"].get("cleaning", {}))


_COUNT_KEYS = {"examples_in", "examples_out", "quarantined"}


def _partials(on: TableVersion | None, split: str, frag: dict[str, Any]) -> dict[str, Any]:
    if "stats" in frag:
        return frag["stats"]
    split_stats = (on.record.get("stats", {}).get("splits", {}).get(split, {})) if on else {}
    sizes = {name: int(np.prod(m["example_shape"])) for name, m in on.schema["arrays"].items()} if on else {}
    return legacy_partials(split_stats, sizes)


def _check_no_overlap(lake: Lake, table: str, latest: TableVersion, on: TableVersion | None,
                      plan: dict[str, Any]) -> None:
    """A racing append won: ours may go on top only if none of our rows' contents arrived with it."""
    if on is not None and latest.schema != on.schema:
        raise CommitConflictError(f"table {table!r} changed its schema in version {latest.version} while this "
                                  "append ran; re-run the append")
    seen = {f["path"] for s in on.splits for f in on.fragments(s)} if on else set()
    theirs: set[bytes] = set()
    for split in latest.splits:
        for frag in latest.fragments(split):
            if frag["path"] not in seen:
                theirs.update(h.tobytes() for h in fragment_keys(lake.storage, table, frag)[0])
    ours = {h.tobytes() for frags in plan["fragments"].values() for f in frags
            for h in fragment_keys(lake.storage, table, f)[0]}
    if theirs & ours:
        raise CommitConflictError(f"table {table!r} version {latest.version} was appended meanwhile with "
                                  f"{len(theirs & ours)} example(s) this append also holds; re-run the append")


def _run(jobs: list[ChunkJob], workers: int | None, progress: bool, uri: str, executor: str = "process",
         ray_address: str | None = None, ran_on: dict[str, Any] | None = None,
         pool: ProcessPoolExecutor | None = None) -> Iterator[dict[str, Any]]:
    """The chunk jobs' results in chunk order: inline, on one worker thread, in the ``pool`` of ``workers`` spawned
    processes, or as Ray tasks."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=f"ingest {uri}", unit="chunk", disable=None)  # None: only on a terminal
    try:
        if executor == "ray":
            from lepton_jax.lake.ray_executor import run_on_ray

            with closing(run_on_ray(jobs, uri, address=ray_address, in_flight=workers, report=ran_on)) as results:
                for result in results:
                    yield result
                    if bar is not None:
                        bar.update(1)
            return
        workers = workers or 1
        if len(jobs) == 1:
            yield process_chunk(jobs[0])
            if bar is not None:
                bar.update(1)
            return
        if workers == 1:  # one worker thread processes chunks one at a time while this thread decides (the driver)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lake-ingest") as threads:
                try:
                    for result in _ahead(threads, jobs, CHUNKS_AHEAD):
                        yield result
                        if bar is not None:
                            bar.update(1)
                finally:  # on a failure: chunks not started yet are dropped, running ones finish before the discard
                    threads.shutdown(wait=True, cancel_futures=True)
            return
        if pool is None:
            pool = _worker_pool(workers)
        with pool:
            try:
                for result in pool.map(process_chunk, jobs):
                    yield result
                    if bar is not None:
                        bar.update(1)
            except BrokenProcessPool as e:
                raise LakeError(f"an ingest worker process died (killed, or out of memory?) while reading {uri}; "
                                "nothing was committed") from e
            finally:  # on a failure: chunks not started yet are dropped, running ones finish before the discard
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if bar is not None:
            bar.close()


def _ahead(pool: ThreadPoolExecutor, jobs: list[ChunkJob], ahead: int) -> Iterator[dict[str, Any]]:
    """``process_chunk`` of every job in order, with at most ``ahead`` jobs running beyond the one yielded (bounded
    memory: each holds a chunk)."""
    yield from read_ahead(pool, process_chunk, jobs, ahead + 1)


def _index_table(index: HashIndex, base: TableVersion) -> None:
    """Loads the hashes the table holds as the starting index: each fragment's 8-byte row-hash keys
    (:func:`~lepton_jax.lake.fragments.fragment_row_keys`: a quarter of its hash file), never its example arrays;
    a fragment's full row hashes and labels are read only when one of its keys matches an appended row."""
    label_array = base.schema.get("label_array", LABEL)
    storage = base.lake.storage

    def load(frag: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        hashes, labels = fragment_keys(storage, base.table, frag, label_array)
        return hashes, labels if labels is not None else np.full(len(hashes), -1)

    for split in base.splits:
        for frag in base.fragments(split):
            index.add_table_keys(fragment_row_keys(storage, base.table, frag, label_array), split,
                                 functools.partial(load, frag))


class _Driver:
    """Cross-chunk decisions in chunk order, against the on-disk index; then the rewrites they need."""

    def __init__(self, lake: Lake, table: str, commit_id: str, index: HashIndex, base: TableVersion | None):
        self.lake, self.table, self.commit_id, self.index, self.base = lake, table, commit_id, index, base
        self.fragments: list[tuple[str, dict[str, Any]]] = []  # (split, entry) in order
        self.drops: dict[int, dict[int, tuple[str, str, int, str]]] = {}  # fragment -> row -> rejection
        self.entries: list[dict[str, Any]] = []
        self.late: list[dict[str, Any]] = []  # rejections decided here (rows written by a worker)
        self.q_fragments: list[dict[str, Any]] = []
        self.q_rows = 0
        self.offset = 0
        self.examples_in = 0
        self.digests: list[str] = []
        self.first: dict[str, Any] | None = None
        self.names: list[str] = []
        self.ranges: dict[str, list[float]] = {}
        self.column_ranges: dict[str, np.ndarray] = {}
        self.column_names: dict[str, list[str]] = {}
        self.source_split: bool | None = None

    def add(self, r: dict[str, Any]) -> None:
        if self.first is None:
            self.first = r
        elif r["arrays"] != self.first["arrays"]:
            raise LakeError(f"source {r['uri']}: chunk {r['chunk']} has arrays {r['arrays']}, the first chunk "
                            f"{self.first['arrays']}; every example must have one shape and dtype")
        longer, shorter = sorted((self.names, r["names"]), key=len, reverse=True)
        if longer[:len(shorter)] != shorter:
            raise LakeError(f"source {r['uri']}: chunk {r['chunk']} has label names {r['names']}, earlier chunks "
                            f"{self.names}")
        self.names = list(longer)
        if self.source_split is None:
            self.source_split = r["source_split"]
        elif self.source_split != r["source_split"]:
            raise LakeError(f"source {r['uri']}: chunk {r['chunk']} disagrees with earlier chunks on whether the "
                            "source assigns splits")
        for k, (lo, hi) in r["ranges"].items():
            have = self.ranges.setdefault(k, [lo, hi])
            have[0], have[1] = min(have[0], lo), max(have[1], hi)
        if set(r["column_ranges"]) != set(self.first["column_ranges"]):
            raise LakeError(f"source {r['uri']}: chunk {r['chunk']} declares column ranges for "
                            f"{sorted(r['column_ranges'])}, the first chunk for {sorted(self.first['column_ranges'])}")
        for k, cols in r["column_ranges"].items():
            have_cols = self.column_ranges.get(k)
            self.column_ranges[k] = cols.copy() if have_cols is None else np.stack(
                [np.minimum(have_cols[:, 0], cols[:, 0]), np.maximum(have_cols[:, 1], cols[:, 1])], axis=1)
        for k, names in r["column_names"].items():
            self.column_names.setdefault(k, names)
        self.digests.append(r["digest"])
        self.examples_in += r["n"] + r["n_source_rejected"]
        offset = self.offset
        for e in r["entries"]:
            self.entries.append({**e, "index": None if e["index"] is None else e["index"] + offset})
        if r["q_arrays"] is not None:
            q = dict(r["q_arrays"])
            q["source_index"] = q["source_index"] + offset
            rows = {int(i): self.q_rows + k for k, i in enumerate(q["source_index"])}
            for e in self.entries[len(self.entries) - len(r["entries"]):]:
                if e["index"] is not None:
                    e["row"] = rows[e["index"]]
            self._write_quarantine_fragment(q)
        for split, f in r["fragments"].items():
            fid = len(self.fragments)
            self.fragments.append((split, f["entry"]))
            self._decide(fid, split, f, offset, r["has_ids"])
        self.offset += r["n"]

    def _decide(self, fid: int, split: str, f: dict[str, Any], offset: int, has_ids: bool) -> None:
        """Drops the fragment's rows whose content the index holds (duplicate, conflicting label, leak) and adds the
        others. The rows' hashes are distinct (the chunk was deduplicated on its own), so one lookup serves all."""
        hashes, labels = f["hashes"], np.asarray(f["labels"], np.int64)
        sources = np.asarray(f["source"], np.int64) + offset
        ids = f["ids"]
        found = self.index.lookup(hashes)
        for row in np.flatnonzero(found >= 0):  # few: only content seen before
            hit = self.index.record(int(found[row]))
            h = hashes[row].tobytes()
            label, source = int(labels[row]), int(sources[row])
            ident = ids[int(f["source"][row])] if ids is not None else f"example {source}"
            where = (f"{hit.ident}" if hit.state != TABLE else
                     f"an example of {self.table}@{self.base.version} split {hit.split!r}")
            if hit.state == CONFLICT or hit.label != label:
                reason, detail = "conflicting_labels", f"{ident}: the same content as {where} with another label"
                if hit.state == NEW:
                    self.index.mark_conflict(int(found[row]))
                    self._drop(hit.fragment, hit.row, "conflicting_labels",
                               f"{hit.ident}: the same content as {ident} with another label", hit.index, hit.ident,
                               h, hit.label)
            elif self.source_split and hit.split != split:
                reason, detail = "leak", f"{ident} in split {split!r} has the same content as {where} in split " \
                                         f"{hit.split!r}"
            else:
                reason, detail = "duplicate", f"{ident} duplicates {where}"
            self._drop(fid, int(row), reason, detail, source, ident, h, label)
        new = np.flatnonzero(found < 0)
        self.index.add(hashes[new], labels[new], split, NEW, fid, new, sources[new], ids,
                       np.asarray(f["source"], np.int64)[new])

    def _drop(self, fid: int, row: int, reason: str, detail: str, source: int, ident: str, h: bytes,
              label: int) -> None:
        self.drops.setdefault(fid, {})[row] = source
        self.late.append({"fid": fid, "row": row, "reason": reason, "detail": detail, "index": source, "id": ident,
                          "sha256": h.hex(), "label": label})

    def _write_quarantine_fragment(self, named: dict[str, np.ndarray]) -> None:
        rel = f"{DATA_DIR}/{self.commit_id}/{QUARANTINE}/{len(self.q_fragments):06d}"
        self.q_fragments.append(self.lake.write_fragment(self.table, rel, named))
        self.q_rows += int(named["label"].shape[0])

    def finish(self) -> dict[str, Any]:
        """Rewrites fragments that lost rows to a later decision, and returns the commit plan."""
        if self.first is None:
            raise LakeError("the source yielded no chunks")
        rewritten: dict[int, dict[str, Any] | None] = {}
        q_named: list[dict[str, np.ndarray]] = []
        where: dict[tuple[int, int], int] = {}
        q_row = self.q_rows
        for fid, rows in sorted(self.drops.items()):
            split, entry = self.fragments[fid]
            hashes = read_row_hashes(self.lake.storage, self.table, entry)
            data = SplitReader(self.lake.uri, self.table, 0, split, {"fragments": [entry]}).read()
            mask = np.ones(hashes.shape[0], dtype=bool)
            mask[list(rows)] = False
            dropped = np.flatnonzero(~mask)
            q = {k: v[dropped] for k, v in data.items()}
            q["source_index"] = np.asarray([rows[int(i)] for i in dropped], dtype=np.int64)
            for k, i in enumerate(dropped):
                where[(fid, int(i))] = q_row + k
            q_row += dropped.size
            q_named.append(q)
            self.lake.storage.delete_prefix(f"{self.table}/{entry['path']}")
            rewritten[fid] = (self.lake.write_fragment(self.table, entry["path"] + "r",
                                                       {k: v[mask] for k, v in data.items()}, hashes=hashes[mask])
                              if mask.any() else None)
        if q_named:
            self._write_quarantine_fragment({k: np.concatenate([q[k] for q in q_named]) for k in q_named[0]})
        names = self.names
        for e in self.late:
            self.entries.append({"id": e["id"], "index": e["index"], "reason": e["reason"], "detail": e["detail"],
                                 "sha256": e["sha256"], "row": where[(e["fid"], e["row"])],
                                 "label": names[e["label"]] if 0 <= e["label"] < len(names) else None})
        fragments: dict[str, list[dict[str, Any]]] = {}
        for fid, (split, entry) in enumerate(self.fragments):
            entry = rewritten.get(fid, entry)
            if entry is not None:
                fragments.setdefault(split, []).append(entry)
        quarantine = self.lake.write_quarantine_entries(self.table, self.commit_id, self.entries)
        if self.q_fragments:
            quarantine["fragments"] = self.q_fragments
            quarantine["num_rows"] = self.q_rows
        kept = sum(int(f["num_examples"]) for fs in fragments.values() for f in fs)
        counts: dict[str, int] = {}
        for e in self.entries:
            counts[e["reason"]] = counts.get(e["reason"], 0) + 1
        cleaning = {"examples_in": self.examples_in, "examples_out": kept, "quarantined": len(self.entries),
                    **dict(sorted(counts.items()))}
        first = self.first
        ranges = {k: [float(v) for v in r] for k, r in self.ranges.items()}
        schema = {"arrays": {name: {"dtype": dtype, "example_shape": shape, "value_range": ranges[name]}
                             for name, (dtype, shape) in first["arrays"].items()},
                  "label_array": "label", "label_names": names}
        if first["targets"]:  # non-class targets (regression): not model inputs
            schema["target_arrays"] = list(first["targets"])
        for name, cols in self.column_ranges.items():  # tabular arrays: scaled and validated per column
            schema["arrays"][name]["column_ranges"] = cols.tolist()
            if name in self.column_names:
                schema["arrays"][name]["columns"] = self.column_names[name]
        digest = self.digests[0] if len(self.digests) == 1 else hashlib.sha256(
            "".join(self.digests).encode()).hexdigest()
        return {"commit_id": self.commit_id, "fragments": fragments, "quarantine": quarantine,
                "cleaning": cleaning, "kept": kept, "schema": schema, "digest": digest, "chunks": len(self.digests),
                "uri": first["uri"], "transforms": first["transforms"], "source_split": bool(self.source_split)}


def _labeller_spec(label_map: dict[str, str] | None, labeller: LabelFn | None,
                   label_names: list[str] | None) -> Any:
    if label_map is not None:
        spec: Any = {"kind": "label_map", "map": dict(sorted(label_map.items()))}
    elif labeller is not None:
        spec = {"kind": "function",
                "name": f"{getattr(labeller, '__module__', '?')}.{getattr(labeller, '__qualname__', repr(labeller))}"}
    else:
        spec = "source labels"
    if label_names is not None:
        spec = {"kind": "source labels"} if spec == "source labels" else spec
        spec["label_names"] = list(label_names)
    return spec


def _check_schema_unchanged(latest: TableVersion, schema: dict[str, Any]) -> None:
    old = {k: (v["dtype"], v["example_shape"]) for k, v in latest.schema["arrays"].items()}
    new = {k: (v["dtype"], v["example_shape"]) for k, v in schema["arrays"].items()}
    if old != new:
        raise LakeError(f"table {latest.table!r} version {latest.version} has arrays {old}, this source gives {new}; "
                        "pass allow_schema_change=True (--allow-schema-change) to change a table's schema")


