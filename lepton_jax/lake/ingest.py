"""Ingest: read a source → validate → label → clean → split → compute statistics → commit.

Every example either lands in exactly one split or in the version's quarantine with a reason — never silently
dropped. Reasons: ``unreadable``/``shape``/``mixed_labels`` (from the source), ``unlabelled`` and ``label_domain``
(labelling), ``non_finite``, ``out_of_range``, ``duplicate`` (same content and label as a kept example),
``conflicting_labels`` (same content, different labels: every copy is quarantined) and ``leak`` (same content as an
example the source put in another split). Re-ingesting identical source content with identical parameters creates
no new version.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from lepton_jax.errors import LakeError
from lepton_jax.lake.faults import crash_point
from lepton_jax.lake.sources import Source, SourceData
from lepton_jax.lake.store import Lake, TableVersion, check_name

DEFAULT_SPLITS = {"train": 0.7, "dev": 0.15, "test": 0.15}
# A labelling function sees one example (array name -> values) and the source's label name (or None) and returns
# the example's label name, or None to abstain (the example goes to the quarantine as 'unlabelled').
LabelFn = Callable[[dict[str, np.ndarray], "str | None"], "str | None"]


@dataclasses.dataclass
class IngestResult:
    version: TableVersion
    created: bool  # False when the identical source was already the latest version
    report: dict[str, Any]


def ingest(lake: Lake, table: str, source: Source, *, splits: dict[str, float] | None = None, seed: int = 0,
           label_map: dict[str, str] | None = None, labeller: LabelFn | None = None,
           label_names: list[str] | None = None, retries: int = 0,
           allow_schema_change: bool = False) -> IngestResult:
    """Reads ``source`` into a new version of ``table`` (or returns the latest if it holds the same content).

    Labels come from the source, or from ``label_map`` (source label name -> label name; unmapped examples are
    quarantined) or a ``labeller`` function. ``label_names`` fixes the label domain (default: the names seen).
    ``retries`` > 0 makes a commit that loses a race with another writer re-check for a no-op and commit on top of
    the winner. A table's array dtypes and example shapes may only change with ``allow_schema_change``.
    """
    if label_map is not None and labeller is not None:
        raise LakeError("give either a label map or a labelling function, not both")
    data = source.load()
    _check_structure(data)
    split_params: dict[str, Any] = ({"from_source": True} if data.split is not None else
                                    {"fractions": dict(splits or DEFAULT_SPLITS), "seed": int(seed),
                                     "stratified_by": "label"})
    labeller_spec = _labeller_spec(label_map, labeller, label_names)
    source_digest = data.digest()

    rebased_onto: list[TableVersion] = []

    def same_ingest(latest: TableVersion) -> TableVersion | None:
        old = latest.record["lineage"]
        same = (old["source"]["sha256"] == source_digest and old["split"] == split_params
                and old.get("labeller", "source labels") == labeller_spec)
        if same:
            rebased_onto.append(latest)
        return latest if same else None

    if lake.versions(table):
        latest = lake.table(table)
        if same_ingest(latest):
            return IngestResult(latest, created=False, report=latest.record["stats"].get("cleaning", {}))

    quarantine: list[dict[str, Any]] = [{**r, "index": None, "sha256": None} for r in data.rejected]
    labels, names, rejects = _label(data, label_map, labeller, label_names)
    keep, hashes, clean_rejects = _clean(data, labels, names)
    rejects.update(clean_rejects)
    for i, (reason, detail) in sorted(rejects.items()):
        keep[i] = False
        quarantine.append({"id": data.example_id(i), "index": int(i), "reason": reason, "detail": detail,
                           "label": names[labels[i]] if labels[i] >= 0 else None, "sha256": hashes[i]})
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        raise LakeError(f"source {data.uri}: every example was rejected ({_count(quarantine)}); nothing to commit")

    if data.split is not None:
        split_index = {str(s): kept[data.split[kept] == s] for s in dict.fromkeys(data.split[kept].tolist())}
        for name in split_index:
            check_name("split", name)
    else:
        split_index = {s: kept[idx] for s, idx in stratified_split(labels[kept], split_params["fractions"],
                                                                   seed).items()}
    _assert_no_leak(split_index, hashes)
    split_arrays = {s: {**{k: v[idx] for k, v in data.arrays.items()}, "label": labels[idx].astype(np.int32)}
                    for s, idx in split_index.items()}

    schema = {
        "arrays": {name: {"dtype": value.dtype.name, "example_shape": list(value.shape[1:]),
                          "value_range": [float(x) for x in data.value_ranges[name]]}
                   for name, value in data.arrays.items()},
        "label_array": "label",
        "label_names": names,
    }
    if lake.versions(table) and not allow_schema_change:
        _check_schema_unchanged(lake.table(table), schema)
    cleaning = {"examples_in": int(len(data.labels) + len(data.rejected)), "examples_out": int(kept.size),
                "quarantined": len(quarantine), **_count(quarantine)}
    lineage = {
        "source": {"name": source.name, "uri": data.uri, "sha256": source_digest},
        "transforms": [*data.transforms,
                       {"name": "drop_non_finite", "dropped": cleaning.get("non_finite", 0)},
                       {"name": "check_value_range", "dropped": cleaning.get("out_of_range", 0),
                        "ranges": {k: v["value_range"] for k, v in schema["arrays"].items()}},
                       {"name": "dedup_exact", "key": "sha256(example)",
                        "dropped": cleaning.get("duplicate", 0) + cleaning.get("conflicting_labels", 0)},
                       {"name": "no_cross_split_leak", "key": "sha256(example)", "dropped": cleaning.get("leak", 0)}],
        "labeller": labeller_spec,
        "split": split_params,
    }
    stats = {"cleaning": cleaning, "splits": {s: _stats(arrs, len(names)) for s, arrs in split_arrays.items()}}
    q_rows = [e for e in quarantine if e["index"] is not None]
    for row, e in enumerate(q_rows):
        e["row"] = row
    q_idx = np.asarray([e["index"] for e in q_rows], dtype=np.int64)
    q_arrays = ({**{k: v[q_idx] for k, v in data.arrays.items()}, "label": labels[q_idx].astype(np.int32),
                 "source_index": q_idx} if q_rows else {})
    version = lake.commit(table, split_arrays, schema=schema, lineage=lineage, stats=stats,
                          quarantine={"entries": quarantine, "arrays": q_arrays}, retries=retries,
                          rebase=same_ingest)
    crash_point("committed")
    created = not rebased_onto
    return IngestResult(version, created=created,
                        report=cleaning if created else version.record["stats"].get("cleaning", {}))


def _count(quarantine: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in quarantine:
        counts[e["reason"]] = counts.get(e["reason"], 0) + 1
    return dict(sorted(counts.items()))


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
    if sizes["labels"] == 0:
        raise LakeError(f"source {data.uri} holds no examples")
    for name, value in data.arrays.items():
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
            raise LakeError(f"source {data.uri}: array {name!r} has non-numeric dtype {value.dtype}")
        if value.ndim < 2:
            raise LakeError(f"source {data.uri}: array {name!r} needs an example axis plus at least one more, got "
                            f"shape {value.shape}")
        if name not in data.value_ranges:
            raise LakeError(f"source {data.uri}: array {name!r} has no declared value range")
        if name == "label":
            raise LakeError(f"source {data.uri}: 'label' is reserved for the label array")
    if not np.issubdtype(data.labels.dtype, np.integer) or data.labels.ndim != 1:
        raise LakeError(f"source {data.uri}: labels must be a 1-D integer array, got {data.labels.dtype} "
                        f"{data.labels.shape}")


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


def _label(data: SourceData, label_map: dict[str, str] | None, labeller: LabelFn | None,
           label_names: list[str] | None) -> tuple[np.ndarray, list[str], dict[int, tuple[str, str]]]:
    """Final label per example (-1 = none), the label names, and label rejections by example index."""
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


def _example_hashes(data: SourceData) -> list[str]:
    n = data.labels.shape[0]
    out = []
    for i in range(n):
        h = hashlib.sha256()
        for name in sorted(data.arrays):
            h.update(np.ascontiguousarray(data.arrays[name][i]).tobytes())
        out.append(h.hexdigest())
    return out


def _clean(data: SourceData, labels: np.ndarray, names: list[str]
           ) -> tuple[np.ndarray, list[str], dict[int, tuple[str, str]]]:
    """Finite values, value ranges, exact duplicates, conflicting labels and cross-split leaks."""
    n = labels.shape[0]
    keep = labels >= 0
    rejects: dict[int, tuple[str, str]] = {}
    for name, value in data.arrays.items():
        flat = value.reshape(n, -1)
        if np.issubdtype(value.dtype, np.floating):
            for i in np.flatnonzero(~np.isfinite(flat).all(axis=1) & keep):
                rejects.setdefault(int(i), ("non_finite", f"{data.example_id(int(i))}: {name!r} holds NaN or inf"))
        lo, hi = data.value_ranges[name]
        with np.errstate(invalid="ignore"):
            out = ((flat < lo) | (flat > hi)).any(axis=1) & keep
        for i in np.flatnonzero(out):
            rejects.setdefault(int(i), ("out_of_range", f"{data.example_id(int(i))}: {name!r} has values in "
                                                        f"[{flat[i].min()}, {flat[i].max()}], outside the declared "
                                                        f"range [{lo}, {hi}]"))
    hashes = _example_hashes(data)
    first: dict[str, int] = {}
    conflicted: set[str] = set()
    for i in range(n):
        if not keep[i] or i in rejects:
            continue
        j = first.setdefault(hashes[i], i)
        if j == i:
            continue
        if labels[j] != labels[i]:
            conflicted.add(hashes[i])
        elif data.split is not None and data.split[j] != data.split[i]:
            rejects[i] = ("leak", f"{data.example_id(i)} in split {data.split[i]!r} has the same content as "
                                  f"{data.example_id(j)} in split {data.split[j]!r}")
        else:
            rejects[i] = ("duplicate", f"{data.example_id(i)} duplicates {data.example_id(j)}")
    for h in conflicted:
        copies = [i for i in range(n) if hashes[i] == h and keep[i]]
        seen = sorted({names[labels[i]] for i in copies})
        for i in copies:
            rejects[i] = ("conflicting_labels", f"{data.example_id(i)}: the same content occurs with labels {seen}")
    return keep.copy(), hashes, rejects


def _assert_no_leak(split_index: dict[str, np.ndarray], hashes: list[str]) -> None:
    owner: dict[str, str] = {}
    for split, idx in split_index.items():
        for i in idx:
            if owner.setdefault(hashes[i], split) != split:
                raise LakeError(f"internal error: example content {hashes[i][:12]} is in splits "
                                f"{owner[hashes[i]]!r} and {split!r}")


def _check_schema_unchanged(latest: TableVersion, schema: dict[str, Any]) -> None:
    old = {k: (v["dtype"], v["example_shape"]) for k, v in latest.schema["arrays"].items()}
    new = {k: (v["dtype"], v["example_shape"]) for k, v in schema["arrays"].items()}
    if old != new:
        raise LakeError(f"table {latest.table!r} version {latest.version} has arrays {old}, this source gives {new}; "
                        "pass allow_schema_change=True (--allow-schema-change) to change a table's schema")


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Sorted example indices per split, stratified by label and reproducible from ``seed``."""
    from sklearn.model_selection import train_test_split  # imported here: it is slow and only needed to split

    total = sum(fractions.values())
    if not np.isclose(total, 1.0) or any(f <= 0 for f in fractions.values()):
        raise LakeError(f"split fractions must be positive and sum to 1, got {fractions}")
    remaining = np.arange(labels.shape[0])
    out: dict[str, np.ndarray] = {}
    left = 1.0
    names = list(fractions)
    for i, name in enumerate(names[:-1]):
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


def _stats(arrays_: dict[str, np.ndarray], num_classes: int) -> dict[str, Any]:
    stats: dict[str, Any] = {"num_examples": int(arrays_["label"].shape[0]),
                             "class_counts": np.bincount(arrays_["label"], minlength=num_classes).tolist()}
    for name, value in arrays_.items():
        if name == "label":
            continue
        v = value.astype(np.float64)
        stats[name] = {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}
    return stats
