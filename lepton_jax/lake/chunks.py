"""One chunk of an ingest, as a worker process runs it: load → validate → label → clean → split → write fragments.

Everything here sees only its chunk; the driver (:mod:`lepton_jax.lake.ingest`) decides across chunks and against
the table (exact dedup, conflicting labels, leaks) with the on-disk hash index, in chunk order, so the result does
not depend on the number of workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from lepton_jax.errors import LakeError
from lepton_jax.lake import arrays
from lepton_jax.lake.fragments import DEFAULT_ROW_HASH, check_name, row_digests, row_hash_field, stores_row_checks
from lepton_jax.lake.index import prefix_keys
from lepton_jax.lake.sources import SourceData, storable_dtype
from lepton_jax.lake.store import DATA_DIR, Lake

# A labelling function sees one example (array name -> values) and the source's label name (or None) and returns
# the example's label name, or None to abstain (the example goes to the quarantine as 'unlabelled').
LabelFn = Callable[[dict[str, np.ndarray], "str | None"], "str | None"]


@dataclasses.dataclass
class ChunkJob:
    """What a worker needs to process one chunk (picklable)."""

    task: Any  # has .load() -> SourceData
    chunk: int
    root: str
    table: str
    commit_id: str
    target_shard_bytes: int
    fractions: dict[str, float] | None
    seed: int
    label_map: dict[str, str] | None = None
    labeller: LabelFn | None = None
    label_names: list[str] | None = None
    crash: bool = False
    single: bool = False  # the source is this one chunk
    compression: str = arrays.DEFAULT_COMPRESSION  # the lake's inner-chunk layout
    row_hash: str = DEFAULT_ROW_HASH  # the table's row hash (fragments.ROW_HASHES)


def process_chunk(job: ChunkJob) -> dict[str, Any]:
    """Loads, validates, labels, cleans (within the chunk), splits and writes one chunk's fragments.

    Returns what the driver needs: per split the fragment entry with its rows' hashes, labels and source indices
    (local to the chunk), the quarantine entries and rows of examples rejected here, and the chunk's digest, schema
    and label names."""
    data = job.task.load()
    _check_structure(data)
    # one chunk at a time; within it, what runs without the GIL (TensorStore's encoding, fsyncs, file digests)
    # overlaps: every split's fragment on a thread of its own
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="lake-chunk") as threads:
        return _process(job, data, threads)


def _process(job: ChunkJob, data: SourceData, threads: ThreadPoolExecutor) -> dict[str, Any]:
    n = int(data.labels.shape[0])
    if n:
        labels, names, rejects = _label(data, job.label_map, job.labeller, job.label_names)
        keep, value_rejects = _check_values(data, labels)
        rejects.update(value_rejects)
    else:  # every example of the chunk was rejected by the source
        labels, keep, rejects = np.zeros(0, np.int64), np.zeros(0, bool), {}
        names = list(job.label_names if job.label_names is not None else data.label_names)
    lake = Lake(job.root, target_shard_bytes=job.target_shard_bytes, compression=job.compression)
    candidates = keep.copy()
    candidates[list(rejects)] = False
    # the fragments are written as if no two candidates shared content (the usual case) while the rows are hashed
    # (hashing holds the GIL; TensorStore's encoding, the statistics and the fsyncs do not)
    hashed: Future[tuple[np.ndarray, np.ndarray]] = Future()  # (row hashes, row checks)
    split_index = _split(job, data, labels, np.flatnonzero(candidates))
    writes = _start_writes(job, lake, data, labels, split_index, hashed, threads)
    try:
        # one pass: the row hash (and, for sha256 tables, the xxh3-64 row check)
        hashes, checks = row_digests(data.arrays, row_hash=job.row_hash, checks=stores_row_checks(job.row_hash))
        dup_rejects = _dedup(data, labels, names, keep, rejects, hashes)
    except BaseException as e:
        hashed.set_exception(e)
        wait(writes.values())
        raise
    hashed.set_result((hashes, checks))
    if dup_rejects:  # rows the chunk holds twice (rare): the fragments are split and written again without them
        wait(writes.values())
        for split in writes:
            lake.storage.delete_prefix(f"{job.table}/{_fragment_path(job, split)}")
        rejects.update(dup_rejects)
        candidates[list(dup_rejects)] = False
        split_index = _split(job, data, labels, np.flatnonzero(candidates))
        writes = _start_writes(job, lake, data, labels, split_index, hashed, threads)
    # the examples' bytes are hashed once: the row hashes serve the source digest too
    digest = data.digest(hashes, row_hash=job.row_hash)
    entries: list[dict[str, Any]] = [{**r, "index": None, **row_hash_field(job.row_hash, None)}
                                     for r in data.rejected]
    for i, (reason, detail) in sorted(rejects.items()):
        keep[i] = False
        entries.append({"id": data.example_id(i), "index": int(i), "reason": reason, "detail": detail,
                        "label": names[labels[i]] if labels[i] >= 0 else None,
                        **row_hash_field(job.row_hash, hashes[i])})
    fragments = {}
    for split, idx in split_index.items():
        fragments[split] = {"entry": writes[split].result(), "hashes": hashes[idx],
                            "labels": labels[idx].astype(np.int32), "source": idx.astype(np.int64),
                            "ids": data.ids}  # the chunk's ids, by source index
    q_idx = np.asarray([e["index"] for e in entries if e["index"] is not None], dtype=np.int64)
    q_arrays = ({**{k: v[q_idx] for k, v in data.arrays.items()}, "label": labels[q_idx].astype(np.int32),
                 "source_index": q_idx} if q_idx.size else None)
    return {"chunk": job.chunk, "digest": digest, "n": n, "n_source_rejected": len(data.rejected),
            "source_split": data.split is not None,
            "uri": data.uri, "names": names, "transforms": data.transforms, "has_ids": data.ids is not None,
            "arrays": {k: (v.dtype.name, list(v.shape[1:])) for k, v in data.arrays.items()},
            "ranges": {k: tuple(float(x) for x in r) for k, r in data.value_ranges.items()},
            "column_ranges": {k: np.asarray(r, np.float64) for k, r in data.column_ranges.items()},
            "column_names": {k: list(v) for k, v in data.column_names.items()},
            "targets": list(getattr(data, "targets", ())),  # a user's SourceData-like object may lack it
            "fragments": fragments, "entries": entries, "q_arrays": q_arrays}


def _split(job: ChunkJob, data: SourceData, labels: np.ndarray, kept: np.ndarray) -> dict[str, np.ndarray]:
    """The kept rows' indices per split (the source's assignment, or a stratified split of the chunk)."""
    if data.split is not None:
        split_index = {str(s): kept[data.split[kept] == s] for s in dict.fromkeys(data.split[kept].tolist())}
        for name in split_index:
            check_name("split", name)
        return split_index
    if not kept.size:
        return {}
    return {s: kept[idx] for s, idx in chunk_split(labels[kept], job.fractions or {}, job.seed, job.chunk,
                                                   single=job.single).items() if idx.size}


def _fragment_path(job: ChunkJob, split: str) -> str:
    return f"{DATA_DIR}/{job.commit_id}/{split}/{job.chunk:06d}"


def _rows(value: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``value[idx]`` for sorted distinct ``idx``: a view, not a copy, when the rows are one contiguous run."""
    if idx.size and int(idx[-1]) - int(idx[0]) + 1 == idx.size:
        return value[int(idx[0]):int(idx[-1]) + 1]
    return value[idx]


def _start_writes(job: ChunkJob, lake: Lake, data: SourceData, labels: np.ndarray,
                  split_index: dict[str, np.ndarray], hashed: Future[tuple[np.ndarray, np.ndarray]],
                  threads: ThreadPoolExecutor) -> dict[str, Future[dict[str, Any]]]:
    """Each split's fragment written on a thread of its own; its row hashes (and checks, where the table stores
    them) are taken from ``hashed`` once its arrays are written."""
    writes = {}
    with_checks = stores_row_checks(job.row_hash)
    for k, (split, idx) in enumerate(split_index.items()):
        named = {**{name: _rows(v, idx) for name, v in data.arrays.items()}, "label": labels[idx].astype(np.int32)}
        writes[split] = threads.submit(lake.write_fragment, job.table, _fragment_path(job, split), named,
                                       crash=job.crash and k == 0, row_hash=job.row_hash,
                                       hashes=lambda idx=idx: hashed.result()[0][idx],
                                       checks=(lambda idx=idx: hashed.result()[1][idx]) if with_checks else None)
    return writes


def warm_up() -> None:
    """Nothing: a worker process that runs it has imported this module (what a chunk needs) before its first chunk."""


def chunk_split(labels: np.ndarray, fractions: dict[str, float], seed: int, chunk: int, *, single: bool = False
                ) -> dict[str, np.ndarray]:
    """Stratified split of one chunk, deterministic from ``seed``, the chunk's position and its labels (so for any
    number of workers). A source in one chunk (``single``) is split by scikit-learn's ``train_test_split`` exactly as
    before fragments existed; a chunk of a multi-chunk source by :func:`stratified_counts` (numpy only, so worker
    processes do not pay scikit-learn's import)."""
    if single:
        return stratified_split(labels, fractions, seed)
    return stratified_counts(labels, fractions, np.random.default_rng([seed, chunk]))


def stratified_counts(labels: np.ndarray, fractions: dict[str, float], rng: np.random.Generator
                      ) -> dict[str, np.ndarray]:
    """Sorted indices per split: each class's examples, in a random order, cut at the split fractions with
    systematic rounding (one random offset per class), so every split gets within one example per class of its
    share and exactly its share in expectation — no split is favoured across many chunks."""
    cumulative = np.cumsum(np.asarray(list(fractions.values()), dtype=np.float64))[:-1]
    out: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = members.size
        cuts = np.r_[0, np.minimum(np.floor(cumulative * n + rng.random()), n).astype(int), n]
        for k in range(len(fractions)):
            out[k].append(members[cuts[k]:cuts[k + 1]])
    return {name: np.sort(np.concatenate(parts)) for name, parts in zip(fractions, out, strict=True)}


def _check_structure(data: SourceData) -> None:
    """Errors that concern the whole source rather than single examples."""
    sizes = {name: value.shape[0] for name, value in data.arrays.items()}
    sizes["labels"] = data.labels.shape[0]
    if data.ids is not None:
        sizes["ids"] = len(data.ids)
    if data.split is not None:
        sizes["split"] = data.split.shape[0]
    if len(set(sizes.values())) != 1:
        raise LakeError(f"source {data.uri}: arrays disagree on the number of examples: {sizes}")
    if sizes["labels"] == 0 and not data.rejected:
        raise LakeError(f"source {data.uri} holds no examples")
    for name, value in data.arrays.items():
        if not storable_dtype(value.dtype):
            raise LakeError(f"source {data.uri}: array {name!r} has dtype {value.dtype}; lake arrays hold booleans, "
                            "integers and floats of up to 64 bits (convert strings, objects, complex numbers and "
                            "dates to those first)")
        if value.ndim < 2:
            raise LakeError(f"source {data.uri}: array {name!r} needs an example axis plus at least one more, got "
                            f"shape {value.shape}")
        if name not in data.value_ranges:
            raise LakeError(f"source {data.uri}: array {name!r} has no declared value range")
        if name == "label":
            raise LakeError(f"source {data.uri}: 'label' is reserved for the label array")
        if name in data.column_ranges:
            columns = np.asarray(data.column_ranges[name], np.float64)
            if columns.shape != (value.shape[-1], 2) or not np.isfinite(columns).all() \
                    or (columns[:, 0] > columns[:, 1]).any():
                raise LakeError(f"source {data.uri}: array {name!r} needs one finite [lo, hi] per column of its last "
                                f"axis ({value.shape[-1]}), got column ranges of shape {columns.shape}")
            lo, hi = data.value_ranges[name]
            if columns[:, 0].min() < lo or columns[:, 1].max() > hi:
                raise LakeError(f"source {data.uri}: array {name!r} has column ranges outside its value range "
                                f"[{lo}, {hi}]")
        names = data.column_names.get(name)
        if names is not None and len(names) != value.shape[-1]:
            raise LakeError(f"source {data.uri}: array {name!r} has {value.shape[-1]} columns but "
                            f"{len(names)} column names")
    if not np.issubdtype(data.labels.dtype, np.integer) or data.labels.ndim != 1:
        raise LakeError(f"source {data.uri}: labels must be a 1-D integer array, got {data.labels.dtype} "
                        f"{data.labels.shape}")


def _label(data: SourceData, label_map: dict[str, str] | None, labeller: LabelFn | None,
           label_names: list[str] | None) -> tuple[np.ndarray, list[str], dict[int, tuple[str, str]]]:
    """Final label per example (-1 = none), the label names, and label rejections by example index."""
    if labeller is None:
        return _label_by_index(data, label_map, label_names)
    n = data.labels.shape[0]
    src = data.labels
    rejects: dict[int, tuple[str, str]] = {}
    src_names: list[str | None] = []
    for i in range(n):
        if 0 <= src[i] < len(data.label_names):
            src_names.append(data.label_names[src[i]])
        else:
            src_names.append(None)
            if label_map is None and labeller is None:
                rejects[i] = ("label_domain", f"{data.example_id(i)}: label index {int(src[i])} outside "
                                              f"[0, {len(data.label_names)})")
    if label_map is not None:
        assigned = [label_map.get(s) if s is not None else None for s in src_names]
        for i, (s, a) in enumerate(zip(src_names, assigned, strict=True)):
            if a is None and i not in rejects:
                rejects[i] = ("unlabelled", f"{data.example_id(i)}: source label {s!r} is not in the label map")
    elif labeller is not None:
        assigned = [labeller({k: v[i] for k, v in data.arrays.items()}, src_names[i]) for i in range(n)]
        for i, a in enumerate(assigned):
            if a is None:
                rejects[i] = ("unlabelled", f"{data.example_id(i)}: the labelling function abstained")
    else:
        assigned = src_names
    names = list(label_names) if label_names is not None else (
        list(data.label_names) if label_map is None and labeller is None
        else sorted({str(a) for a in assigned if a is not None}))
    index = {name: k for k, name in enumerate(names)}
    labels = np.full(n, -1, dtype=np.int64)
    for i, a in enumerate(assigned):
        if a is None or i in rejects:
            continue
        if str(a) not in index:
            rejects[i] = ("label_domain", f"{data.example_id(i)}: label {a!r} is outside the label domain {names}")
            continue
        labels[i] = index[str(a)]
    return labels, names, rejects


def _label_by_index(data: SourceData, label_map: dict[str, str] | None, label_names: list[str] | None
                    ) -> tuple[np.ndarray, list[str], dict[int, tuple[str, str]]]:
    """:func:`_label` without a labelling function: a label depends only on the source's label index, so one lookup
    table per source label gives every example's label (a Python step only for rejected examples)."""
    src = data.labels
    n_src = len(data.label_names)
    valid = (src >= 0) & (src < n_src)
    assigned = list(data.label_names) if label_map is None else [label_map.get(s) for s in data.label_names]
    if label_names is not None:
        names = list(label_names)
    elif label_map is None:
        names = list(data.label_names)
    else:
        present = np.unique(src[valid]) if src.size else np.zeros(0, np.int64)
        names = sorted({str(assigned[k]) for k in present.tolist() if assigned[k] is not None})
    index = {name: k for k, name in enumerate(names)}
    # per source label index: the label (>= 0), -1 outside the label domain, -2 not in the label map; -3: bad index
    table = np.asarray([(index.get(str(a), -1) if a is not None else -2) for a in assigned] + [-3], dtype=np.int64)
    code = table[np.where(valid, src, n_src)]
    rejects: dict[int, tuple[str, str]] = {}
    for i in np.flatnonzero(code < 0).tolist():
        c = int(code[i])
        if c == -3 and label_map is None:
            rejects[i] = ("label_domain", f"{data.example_id(i)}: label index {int(src[i])} outside [0, {n_src})")
        elif c in (-3, -2):
            s = data.label_names[src[i]] if c == -2 else None
            rejects[i] = ("unlabelled", f"{data.example_id(i)}: source label {s!r} is not in the label map")
        else:
            rejects[i] = ("label_domain", f"{data.example_id(i)}: label {assigned[src[i]]!r} is outside the label "
                                          f"domain {names}")
    return np.maximum(code, -1), names, rejects


def _check_values(data: SourceData, labels: np.ndarray) -> tuple[np.ndarray, dict[int, tuple[str, str]]]:
    """The labelled rows (``keep``), and rejections of those with non-finite values or values out of range."""
    n = labels.shape[0]
    keep = labels >= 0
    rejects: dict[int, tuple[str, str]] = {}
    for name, value in data.arrays.items():
        flat = value.reshape(n, -1)
        if np.issubdtype(value.dtype, np.floating):
            for i in np.flatnonzero(~np.isfinite(flat).all(axis=1) & keep):
                rejects.setdefault(int(i), ("non_finite", f"{data.example_id(int(i))}: {name!r} holds NaN or inf"))
        lo, hi = data.value_ranges[name]
        with np.errstate(invalid="ignore"):  # per-row extremes: no temporary as large as the chunk
            if flat.size and lo <= flat.min() and flat.max() <= hi:  # the whole chunk in range (a NaN fails this)
                out = np.zeros(n, dtype=bool)
            else:
                low, high = (flat.min(axis=1), flat.max(axis=1)) if flat.shape[1] else (np.zeros(n), np.zeros(n))
                out = ((low < lo) | (high > hi)) & keep
        for i in np.flatnonzero(out):
            rejects.setdefault(int(i), ("out_of_range", f"{data.example_id(int(i))}: {name!r} has values in "
                                                        f"[{flat[i].min()}, {flat[i].max()}], outside the declared "
                                                        f"range [{lo}, {hi}]"))
        if name in data.column_ranges and n:
            columns = np.asarray(data.column_ranges[name], np.float64)
            cols = value.reshape(-1, value.shape[-1]).reshape(n, -1, value.shape[-1])
            with np.errstate(invalid="ignore"):
                bad = ((cols < columns[:, 0]) | (cols > columns[:, 1])).any(axis=1) & keep[:, None]
            for i in np.flatnonzero(bad.any(axis=1)):
                c = int(np.flatnonzero(bad[i])[0])
                rejects.setdefault(int(i), ("out_of_range", f"{data.example_id(int(i))}: {name!r} column {c} "
                                                            f"holds values outside its declared range "
                                                            f"[{columns[c, 0]}, {columns[c, 1]}]"))
    return keep, rejects


def _dedup(data: SourceData, labels: np.ndarray, names: list[str], keep: np.ndarray,
           rejects: dict[int, tuple[str, str]], hashes: np.ndarray) -> dict[int, tuple[str, str]]:
    """Rejections of exact duplicates, conflicting labels and cross-split leaks within the chunk, among the kept
    rows (``keep``) not already rejected (``rejects``)."""
    n = labels.shape[0]
    candidates = keep.copy()
    candidates[list(rejects)] = False
    prefixes = np.sort(prefix_keys(hashes[candidates]))
    if not (prefixes[1:] == prefixes[:-1]).any():
        return {}  # no two candidates share content (the usual case)
    rejects = dict(rejects)
    before = set(rejects)
    keys = [h.tobytes() for h in hashes]
    first: dict[bytes, int] = {}
    conflicted: set[bytes] = set()
    for i in range(n):
        if not keep[i] or i in rejects:
            continue
        j = first.setdefault(keys[i], i)
        if j == i:
            continue
        if labels[j] != labels[i]:
            conflicted.add(keys[i])
        elif data.split is not None and data.split[j] != data.split[i]:
            rejects[i] = ("leak", f"{data.example_id(i)} in split {data.split[i]!r} has the same content as "
                                  f"{data.example_id(j)} in split {data.split[j]!r}")
        else:
            rejects[i] = ("duplicate", f"{data.example_id(i)} duplicates {data.example_id(j)}")
    for h in conflicted:
        copies = [i for i in range(n) if keys[i] == h and keep[i]]
        seen = sorted({names[labels[i]] for i in copies})
        for i in copies:
            rejects[i] = ("conflicting_labels", f"{data.example_id(i)}: the same content occurs with labels {seen}")
    return {i: r for i, r in rejects.items() if i not in before or r[0] == "conflicting_labels"}


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Sorted example indices per split, stratified by label and reproducible from ``seed``."""
    total = sum(fractions.values())
    if not np.isclose(total, 1.0) or any(f <= 0 for f in fractions.values()):
        raise LakeError(f"split fractions must be positive and sum to 1, got {fractions}")
    remaining = np.arange(labels.shape[0])
    out: dict[str, np.ndarray] = {}
    left = 1.0
    names = list(fractions)
    for i, name in enumerate(names[:-1]):
        # imported here: it is slow (seconds) and only needed to split, not for one split that takes every example
        from sklearn.model_selection import train_test_split

        share = fractions[name] / left
        try:
            taken, remaining = train_test_split(remaining, train_size=share, stratify=labels[remaining],
                                                random_state=seed + i)
        except ValueError as e:
            raise LakeError(f"cannot split {labels.shape[0]} examples into {fractions} stratified by label "
                            f"(class counts {np.bincount(labels).tolist()}): {e}") from e
        out[name] = np.sort(taken)
        left -= fractions[name]
    out[names[-1]] = np.sort(remaining)
    return out


