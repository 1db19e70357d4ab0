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
from lepton_jax.lake.decide import Driver, index_table
from lepton_jax.lake.faults import crash_point
from lepton_jax.lake.fragments import (
    DEFAULT_ROW_HASH,
    check_row_hash,
    combine_stats,
    fragment_keys,
    legacy_partials,
    read_ahead,
)
from lepton_jax.lake.index import HashIndex
from lepton_jax.lake.processes import die_with, process_start
from lepton_jax.lake.sources import Source, check_source, digest_of_rows, source_tasks
from lepton_jax.lake.store import DATA_DIR, LEASE_DIR, Lake, TableVersion, check_name

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
           ray_address: str | None = None, progress: bool = False, row_hash: str | None = None) -> IngestResult:
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
    and commits, exactly as with processes. ``row_hash`` is the rows' identity hash (dedup, leaks, content digests):
    a new table's default is ``xxh3_128``; ``sha256`` where rows crafted to collide are a concern (untrusted
    sources); an existing table keeps its own, and an append may not name another.
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
    row_hash = _row_hash(base, row_hash, appending)
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
                       progress=progress, row_hash=row_hash)
    except BrokenProcessPool as e:
        raise LakeError(f"an ingest worker process died (killed, or out of memory?) while reading {source.uri}; "
                        "nothing was committed") from e
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _row_hash(base: TableVersion | None, requested: str | None, appending: bool) -> str:
    """The row hash this ingest writes: ``requested`` (default ``xxh3_128``) for a new table, the table's own for an
    existing one (an append that names another is an error; an overwrite may switch)."""
    if requested is not None:
        check_row_hash(requested)
    if base is None or (requested is not None and not appending):  # a new version of only this source's rows
        return requested or DEFAULT_ROW_HASH
    have = base.row_hash
    if appending and requested is not None and requested != have:
        raise LakeError(f"table {base.table!r} identifies rows by {have}; an append must keep it (got "
                        f"--row-hash {requested}); ingest with --mode overwrite to change it")
    return requested or have


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
            progress: bool, row_hash: str) -> IngestResult:
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
                     compression=lake.compression, row_hash=row_hash)
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
            with HashIndex(commit_dir) as index, ThreadPoolExecutor(1, thread_name_prefix="lake-index") as loader:
                # an append's index of the table's keys loads (reads, checks) while the first chunk is processed
                indexed = loader.submit(index_table, index, base) if appending else None
                state = Driver(lake, table, commit_id, index, base if appending else None, row_hash=row_hash)
                # closed before the data is discarded on a failure: no worker may still write into it then
                with closing(_run(jobs, workers, progress, source.uri, executor, ray_address, ran_on,
                                  pool)) as results:
                    for result in results:
                        if indexed is not None:
                            indexed.result()
                            indexed = None
                        state.add(result)
                        renew_lease()
                if indexed is not None:  # a source with no chunk
                    indexed.result()
                plan = state.finish()
            result = _commit(lake, table, source, plan, base, appending, split_params, labeller_spec, retries,
                             allow_schema_change, row_hash)
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
            allow_schema_change: bool, row_hash: str) -> IngestResult:
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
                  {"name": "dedup_exact", "key": f"{row_hash}(example)", "index": "on-disk, whole dataset" +
                   (" and table" if appending else ""),
                   "dropped": cleaning.get("duplicate", 0) + cleaning.get("conflicting_labels", 0)},
                  {"name": "no_cross_split_leak", "key": f"{row_hash}(example)", "dropped": cleaning.get("leak", 0)}]
    lineage = {"source": {"name": source.name, "uri": plan["uri"], "sha256": plan["digest"],
                          "digest": digest_of_rows(row_hash), "chunks": plan["chunks"]},
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
        if on is not None and on.row_hash != row_hash:
            raise LakeError(f"table {table!r} was overwritten with rows identified by another hash while this "
                            f"append ran (version {on.version}); nothing was published: append again")
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


