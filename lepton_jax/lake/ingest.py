"""Ingest: read a source, validate, clean, split (stratified, seeded), compute statistics, commit.

Re-ingesting identical source content with identical parameters creates no new version.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from lepton_jax.errors import LakeError
from lepton_jax.lake.sources import Source, SourceData
from lepton_jax.lake.store import Lake, TableVersion

DEFAULT_SPLITS = {"train": 0.7, "dev": 0.15, "test": 0.15}


@dataclasses.dataclass
class IngestResult:
    version: TableVersion
    created: bool  # False when the identical source was already the latest version
    report: dict[str, Any]


def ingest(lake: Lake, table: str, source: Source, *, splits: dict[str, float] | None = None,
           seed: int = 0) -> IngestResult:
    """Reads ``source`` into a new version of ``table`` (or returns the latest if it holds the same content)."""
    splits = dict(splits or DEFAULT_SPLITS)
    data = source.load()
    _validate(data)
    source_digest = data.digest()
    split_params = {"fractions": splits, "seed": int(seed), "stratified_by": "label"}
    versions = lake.versions(table)
    if versions:
        latest = lake.table(table)
        lineage = latest.record["lineage"]
        if lineage["source"]["sha256"] == source_digest and lineage["split"] == split_params:
            return IngestResult(latest, created=False, report=latest.record["stats"].get("cleaning", {}))

    cleaned, cleaning = _clean(data)
    split_index = stratified_split(cleaned.labels, splits, seed)
    split_arrays = {name: {**{k: v[idx] for k, v in cleaned.arrays.items()},
                           "label": cleaned.labels[idx].astype(np.int32)}
                    for name, idx in split_index.items()}
    schema = {
        "arrays": {name: {"dtype": value.dtype.name, "example_shape": list(value.shape[1:]),
                          "value_range": list(cleaned.value_ranges[name])}
                   for name, value in cleaned.arrays.items()},
        "label_array": "label",
        "label_names": cleaned.label_names,
    }
    lineage = {
        "source": {"name": source.name, "uri": data.uri, "sha256": source_digest},
        "transforms": [
            {"name": "drop_non_finite", "dropped": cleaning["non_finite"]},
            {"name": "dedup_exact", "key": "sha256(example)", "dropped": cleaning["duplicates"]},
        ],
        "labeller": "source labels",
        "split": split_params,
    }
    stats = {"cleaning": cleaning, "splits": {name: _stats(arrs, len(cleaned.label_names))
                                              for name, arrs in split_arrays.items()}}
    version = lake.commit(table, split_arrays, schema=schema, lineage=lineage, stats=stats)
    return IngestResult(version, created=True, report=cleaning)


def _validate(data: SourceData) -> None:
    sizes = {name: value.shape[0] for name, value in data.arrays.items()}
    sizes["labels"] = data.labels.shape[0]
    if len(set(sizes.values())) != 1:
        raise LakeError(f"source {data.uri}: arrays disagree on the number of examples: {sizes}")
    if data.labels.size and (data.labels.min() < 0 or data.labels.max() >= len(data.label_names)):
        raise LakeError(f"source {data.uri}: labels must lie in [0, {len(data.label_names)}), "
                        f"got [{data.labels.min()}, {data.labels.max()}]")
    for name, value in data.arrays.items():
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
            raise LakeError(f"source {data.uri}: array {name!r} has non-numeric dtype {value.dtype}")


def _clean(data: SourceData) -> tuple[SourceData, dict[str, Any]]:
    """Drops examples with non-finite values and exact duplicates (keeping the first)."""
    n = data.labels.shape[0]
    keep = np.ones(n, dtype=bool)
    for value in data.arrays.values():
        if np.issubdtype(value.dtype, np.floating):
            keep &= np.isfinite(value.reshape(n, -1)).all(axis=1)
    non_finite = int(n - keep.sum())
    seen: set[str] = set()
    duplicates = 0
    for i in np.flatnonzero(keep):
        h = hashlib.sha256()
        for name in sorted(data.arrays):
            h.update(np.ascontiguousarray(data.arrays[name][i]).tobytes())
        key = h.hexdigest()
        if key in seen:
            keep[i] = False
            duplicates += 1
        seen.add(key)
    for name, (lo, hi) in data.value_ranges.items():
        value = data.arrays[name][keep]
        if value.size and (value.min() < lo or value.max() > hi):
            raise LakeError(f"source {data.uri}: array {name!r} has values in [{value.min()}, {value.max()}], "
                            f"outside its declared range [{lo}, {hi}]")
    cleaned = SourceData({k: v[keep] for k, v in data.arrays.items()}, data.labels[keep], data.label_names,
                         data.value_ranges, data.uri)
    return cleaned, {"examples_in": n, "examples_out": int(keep.sum()), "non_finite": non_finite,
                     "duplicates": duplicates}


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
        share = fractions[name] / left
        taken, remaining = train_test_split(remaining, train_size=share, stratify=labels[remaining],
                                            random_state=seed + i)
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
