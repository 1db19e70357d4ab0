"""Per-batch preprocessing shared by training, evaluation and prediction (one definition, one behaviour).

A table holds one model-input array (``image`` from image sources, ``signal`` from CSV sensor windows, ``features``
from tabular sets) plus the label array. Lake arrays keep raw source values; models see the input array under the
batch key :data:`INPUT`, scaled to [0, 1] with the ranges in the table's schema, which is also the input box for
adversarial attacks. Tabular arrays carry ``column_ranges`` (one ``[lo, hi]`` per entry of the last axis, recorded
at ingest) and are scaled per column; other arrays (images, sensor windows) carry only the one ``value_range``, which
acts as a per-column range broadcast to every column (tables and runs from before per-column ranges read the same).
Per-column min/max scaling rather than standardisation keeps one bounded input box for every table, which attacks,
range validation, drift histograms and exported artifacts rely on (measured to reach a standardised logistic
regression on wine and breast_cancer: ``scripts/tabular_baselines.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lepton_jax.errors import ConfigError

INPUT = "input"  # the batch key models read
LABEL = "label"


def target_arrays(schema: dict[str, Any]) -> list[str]:
    """The table's non-class target arrays (e.g. a float regression target), named by its source; none for tables
    that hold only class labels (and tables ingested before targets existed)."""
    return list(schema.get("target_arrays") or [])


def input_array(schema: dict[str, Any]) -> str:
    """The name of the table's model-input array: its one array besides the label and target arrays."""
    skip = {schema["label_array"], *target_arrays(schema)}
    names = [name for name in schema["arrays"] if name not in skip]
    if len(names) != 1:
        raise ConfigError(f"a trainable table has exactly one input array besides {sorted(skip)}; "
                          f"this one has {names or 'none'}")
    return names[0]


def input_spec(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema entry (``example_shape``, ``dtype``, ``value_range``, ...) of the table's input array."""
    return schema["arrays"][input_array(schema)]


Bound = float | np.ndarray


def input_bounds(spec: dict[str, Any]) -> tuple[Bound, Bound]:
    """``(lo, hi)`` of an array's schema entry: float32 vectors over the last axis when the entry has
    ``column_ranges``, else the ``value_range`` as two Python floats (which broadcast to every column)."""
    columns = spec.get("column_ranges")
    if columns is not None:
        bounds = np.asarray(columns, np.float64).reshape(-1, 2)
        return bounds[:, 0].astype(np.float32), bounds[:, 1].astype(np.float32)
    return float(spec["value_range"][0]), float(spec["value_range"][1])


def scale(values: Any, lo: Bound, hi: Bound) -> Any:
    """``(values - lo) / (hi - lo)`` for numpy or jax arrays; a constant column (``hi == lo``) maps to 0."""
    if isinstance(lo, np.ndarray):
        width = np.where(hi > lo, np.asarray(hi, np.float32) - np.asarray(lo, np.float32), np.float32(1.0))
        return (values - lo) / width
    return (values - lo) / (hi - lo if hi > lo else 1.0)


def scale_to_unit(values: np.ndarray, value_range: Any) -> np.ndarray:
    """Raw values -> float32 in [0, 1] for a ``(lo, hi)`` pair or a schema entry (per-column when it has
    ``column_ranges``)."""
    lo, hi = input_bounds(value_range) if isinstance(value_range, dict) else (float(value_range[0]),
                                                                              float(value_range[1]))
    return np.asarray(scale(np.asarray(values, np.float32), lo, hi)).astype(np.float32)


def out_of_range(raw: np.ndarray, spec: dict[str, Any]) -> str | None:
    """Why ``raw`` (N, *example_shape) lies outside the schema's ranges (naming the first offending column of a
    tabular array), or None when every value is inside."""
    if not raw.size:
        return None
    lo, hi = input_bounds(spec)
    if not isinstance(lo, np.ndarray):
        if raw.min() < lo or raw.max() > hi:
            return f"values span [{raw.min()}, {raw.max()}] but the model was trained on [{lo}, {hi}]"
        return None
    flat = raw.reshape(-1, lo.shape[0])
    low, high = flat.min(axis=0), flat.max(axis=0)
    bad = np.flatnonzero((low < lo) | (high > hi))
    if not bad.size:
        return None
    c = int(bad[0])
    names = spec.get("columns")
    column = f"column {c}" + (f" ({names[c]})" if names else "")
    return (f"{column} spans [{low[c]}, {high[c]}] but the model was trained on [{lo[c]}, {hi[c]}]"
            + (f" ({bad.size} columns out of range)" if bad.size > 1 else ""))


def prepare_batch(batch: dict[str, np.ndarray], schema: dict[str, Any]) -> dict[str, np.ndarray]:
    """Raw lake rows -> model inputs: :data:`INPUT` float32 in [0, 1], :data:`LABEL` int32 (when present), or the
    table's first target array as float32 in its own units when the schema names targets (the task scales it)."""
    name = input_array(schema)
    out = {INPUT: scale_to_unit(batch[name], schema["arrays"][name])}
    targets = target_arrays(schema)
    if targets:
        if targets[0] in batch:
            out[LABEL] = np.asarray(batch[targets[0]], np.float32)
    elif schema["label_array"] in batch:
        out[LABEL] = batch[schema["label_array"]].astype(np.int32)
    return out
