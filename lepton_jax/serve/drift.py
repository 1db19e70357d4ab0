"""Input and prediction drift: population stability index (PSI) against the training data's statistics.

Features are *groups* of input cells: the image is cut into a grid of regions and each region's mean value (in the
lake table's raw units) is one feature, histogrammed over the schema's value range. A tabular table (schema
``column_ranges``) has one feature per column instead, histogrammed over that column's own range. The reference
histograms of the training split and its predicted-class distribution are stored with each registered model version; a
:class:`DriftMonitor` keeps a sliding window of live traffic and compares it with them.

    PSI = sum_i (live_i - ref_i) * ln(live_i / ref_i)      (proportions per bin, additively smoothed)

Common reading: < 0.1 no shift, 0.1-0.25 moderate, > 0.25 a shift worth acting on.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger("lepton_jax.serve.drift")

DEFAULT_GRID = (2, 2)
DEFAULT_BINS = 8
SMOOTHING = 0.5


def group_names(grid: Sequence[int]) -> list[str]:
    return [f"r{r}c{c}" for r in range(grid[0]) for c in range(grid[1])]


def group_features(raw: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """(N, H, W[, C]) raw examples -> (N, G) region means, G = grid rows x grid cols (row-major)."""
    x = np.asarray(raw, np.float64)
    if x.ndim == 3:
        x = x[..., None]
    n, h, w = x.shape[:3]
    rows, cols = int(grid[0]), int(grid[1])
    edges_h = np.linspace(0, h, rows + 1).round().astype(int)
    edges_w = np.linspace(0, w, cols + 1).round().astype(int)
    out = np.empty((n, rows * cols), np.float64)
    for r in range(rows):
        for c in range(cols):
            out[:, r * cols + c] = x[:, edges_h[r]:edges_h[r + 1], edges_w[c]:edges_w[c + 1]].reshape(n, -1).mean(1)
    return out


def bin_indices(features: np.ndarray, value_range: Sequence[Any], bins: int) -> np.ndarray:
    """Equal-width bin index in [0, bins) of each feature over ``value_range`` — one ``[lo, hi]`` for every feature,
    or one per feature (G, 2) — values outside are clipped; a constant feature falls in bin 0."""
    r = np.asarray(value_range, np.float64)
    lo, hi = (float(r[0]), float(r[1])) if r.ndim == 1 else (r[:, 0], r[:, 1])
    width = np.where(np.asarray(hi) > lo, np.asarray(hi) - lo, 1.0)
    idx = np.floor((features - lo) / width * bins).astype(np.int64)
    return np.clip(idx, 0, bins - 1)


def reference_features(raw: np.ndarray, reference: dict[str, Any]) -> np.ndarray:
    """(N, G) drift features of raw examples as ``reference`` defines them: region means, or tabular columns."""
    if reference.get("feature") == "column":
        x = np.asarray(raw, np.float64)
        return x.reshape(x.shape[0], -1)
    return group_features(raw, reference["grid"])


def reference_stats(raw: np.ndarray, predicted: np.ndarray, *, num_classes: int, value_range: Sequence[float],
                    grid: Sequence[int] = DEFAULT_GRID, bins: int = DEFAULT_BINS, split: str = "train",
                    column_ranges: Sequence[Sequence[float]] | None = None, columns: Sequence[str] | None = None
                    ) -> dict[str, Any]:
    """The statistics a registry entry keeps for drift: per-group histograms and predicted-class counts.

    With ``column_ranges`` (a tabular table: raw is (N, C)) each column is a group, binned over its own range."""
    if column_ranges is not None:
        ranges = np.asarray(column_ranges, np.float64).reshape(-1, 2)
        names = list(columns) if columns is not None else [f"c{c}" for c in range(ranges.shape[0])]
        ref: dict[str, Any] = {"grid": None, "feature": "column", "value_range": ranges.tolist()}
    else:
        names = group_names(grid)
        ref = {"grid": list(map(int, grid)), "feature": "region mean of raw values",
               "value_range": [float(v) for v in value_range]}
    idx = bin_indices(reference_features(raw, ref), ref["value_range"], bins)
    counts = [np.bincount(idx[:, g], minlength=bins).tolist() for g in range(idx.shape[1])]
    return {"split": split, "num_examples": int(idx.shape[0]), "bins": int(bins), **ref,
            "groups": dict(zip(names, counts, strict=True)),
            "predicted_classes": np.bincount(np.asarray(predicted, np.int64), minlength=num_classes).tolist()}


def psi(expected: np.ndarray, actual: np.ndarray, smoothing: float = SMOOTHING) -> float:
    """Population stability index between two histograms of counts (same bins)."""
    e = np.asarray(expected, np.float64) + smoothing
    a = np.asarray(actual, np.float64) + smoothing
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def drift_report(reference: dict[str, Any], raw: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """PSI of a batch of examples (and their predicted classes) against ``reference``, per group and overall."""
    idx = bin_indices(reference_features(raw, reference), reference["value_range"], reference["bins"])
    groups = {name: psi(ref, np.bincount(idx[:, g], minlength=reference["bins"]))
              for g, (name, ref) in enumerate(reference["groups"].items())}
    classes = np.bincount(np.asarray(predicted, np.int64), minlength=len(reference["predicted_classes"]))
    return {"groups": groups, "max_group": max(groups.values()),
            "predictions": psi(reference["predicted_classes"], classes), "num_examples": int(idx.shape[0])}


class DriftMonitor:
    """Incremental histograms of live inputs and predictions over a sliding window, compared with a reference.

    The serving hot path only calls :meth:`observe`, which queues a reference to the batch (bounded: when updates
    fall behind, the oldest queued batches are dropped and counted in ``dropped``). :meth:`update`, run by a
    background task, bins the queued batches, adds them to the window's per-group histograms, evicts what falls
    out of the window (by count, ``window`` examples, and by age, ``window_s`` seconds) by subtracting its counts,
    and recomputes PSI from the histograms: O(new examples + groups x bins), never the whole window.

    ``report(kind, name, value)`` is called with each recomputed PSI (kind ``"input"`` per group, ``"prediction"``),
    e.g. to set Prometheus gauges. Crossing ``threshold`` upwards logs one warning per feature group.
    """

    def __init__(self, reference: dict[str, Any], *, model: str = "model", window: int = 1000,
                 window_s: float | None = None, min_samples: int = 200, threshold: float = 0.25,
                 max_pending: int = 256, report: Callable[[str, str, float], None] | None = None):
        self.reference, self.model = reference, model
        self.window, self.min_samples, self.threshold = int(window), int(min_samples), float(threshold)
        self.window_s = window_s
        self._report = report
        self._names = list(reference["groups"])
        self._ref_groups = np.asarray([reference["groups"][n] for n in self._names], np.float64)
        self._ref_classes = np.asarray(reference["predicted_classes"], np.float64)
        self._bins = int(reference["bins"])
        self._counts = np.zeros((len(self._names), self._bins), np.int64)
        self._class_counts = np.zeros(self._ref_classes.size, np.int64)
        self._chunks: collections.deque[tuple[float, np.ndarray, np.ndarray]] = collections.deque()
        self._filled = 0
        self._pending: collections.deque[tuple[float, np.ndarray, np.ndarray]] = collections.deque(
            maxlen=int(max_pending))
        self.observed = 0
        self.dropped = 0
        self._alerting: set[str] = set()
        self._lock = threading.Lock()
        self.latest: dict[str, Any] = {}
        self.updated_at: float | None = None  # time.monotonic() of the last PSI computation

    def observe(self, raw: np.ndarray, predicted: np.ndarray) -> None:
        """Queues a served batch for the next :meth:`update` (cheap: no binning, no PSI)."""
        if len(self._pending) == self._pending.maxlen:
            self.dropped += self._pending[0][1].shape[0]
        self._pending.append((time.monotonic(), raw, np.asarray(predicted)))
        self.observed += raw.shape[0]

    @property
    def age_s(self) -> float:
        """Seconds since the PSI values were last recomputed (inf before the first time)."""
        return float("inf") if self.updated_at is None else time.monotonic() - self.updated_at

    def update(self) -> dict[str, Any] | None:
        """Folds queued batches into the window and recomputes PSI; returns it once ``min_samples`` are in."""
        ref = self.reference
        with self._lock:
            while self._pending:
                t, raw, predicted = self._pending.popleft()
                idx = bin_indices(reference_features(raw, ref), ref["value_range"], self._bins)[-self.window:]
                predicted = predicted[-self.window:].astype(np.int64)
                self._add(t, idx, predicted, +1)
            self._evict()
            if self._filled < self.min_samples:
                return None
            groups = {name: psi(self._ref_groups[g], self._counts[g]) for g, name in enumerate(self._names)}
            pred = psi(self._ref_classes, self._class_counts)
            self.latest = {"groups": groups, "predictions": pred, "num_examples": self._filled}
            self.updated_at = time.monotonic()
            self._alert({**{f"input {n}": v for n, v in groups.items()}, "predicted classes": pred}, self._filled)
        if self._report:
            for name, value in groups.items():
                self._report("input", name, value)
            self._report("prediction", "classes", pred)
        return self.latest

    @property
    def num_examples(self) -> int:
        return self._filled

    def _add(self, t: float, idx: np.ndarray, predicted: np.ndarray, sign: int) -> None:
        for g in range(idx.shape[1]):
            self._counts[g] += sign * np.bincount(idx[:, g], minlength=self._bins)
        self._class_counts += sign * np.bincount(predicted, minlength=self._class_counts.size)
        self._filled += sign * idx.shape[0]
        if sign > 0:
            self._chunks.append((t, idx, predicted))

    def _evict(self) -> None:
        cutoff = None if self.window_s is None else time.monotonic() - self.window_s
        while self._chunks:
            t, idx, predicted = self._chunks[0]
            excess = self._filled - self.window
            if cutoff is not None and t < cutoff:
                excess = idx.shape[0]
            if excess <= 0:
                break
            take = min(excess, idx.shape[0])
            self._add(t, idx[:take], predicted[:take], -1)
            if take == idx.shape[0]:
                self._chunks.popleft()
            else:
                self._chunks[0] = (t, idx[take:], predicted[take:])

    def _alert(self, values: dict[str, float], filled: int) -> None:
        for name, value in values.items():
            if value > self.threshold and name not in self._alerting:
                self._alerting.add(name)
                log.warning("model %s: drift on %s: PSI %.3f > %.2f over the last %d examples", self.model, name,
                            value, self.threshold, filled)
            elif value <= self.threshold:
                self._alerting.discard(name)
