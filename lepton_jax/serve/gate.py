"""The promotion gate: a candidate model version and a stage's incumbent scored on the same pinned rows.

Both versions classify every row of one split of one *pinned* lake table version (default: the table and version
the candidate was trained on, its ``test`` split), read once and fed to both, and are scored with the metric code of
``lepton-jax eval`` (:func:`lepton_jax.eval.metrics.classification_summary` over
:meth:`lepton_jax.serve.Predictor.predict`). The candidate passes when ``candidate >= incumbent - tolerance`` (every
metric here is higher-is-better), or when the stage holds nothing yet. :class:`Gate` keeps each version's score, so
re-comparing against a new incumbent (a promotion that landed first) evaluates only the newcomer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from lepton_jax.errors import RegistryError

# metric name -> its value in `lepton-jax eval`'s classification summary (all higher-is-better)
METRICS: dict[str, Callable[[dict[str, Any]], float]] = {
    "accuracy": lambda s: float(s["accuracy"]),
    "macro_f1": lambda s: float(s["report"]["macro avg"]["f1-score"]),
    "weighted_f1": lambda s: float(s["report"]["weighted avg"]["f1-score"]),
}
PROMOTE, REFUSE = "promote", "refuse"


class Gate:
    """Compares ``candidate`` with incumbents (registry :class:`~lepton_jax.serve.registry.ModelVersion`s; the
    registry imports this module) on one split of one pinned table version."""

    def __init__(self, candidate: Any, *, split: str = "test", table_version: int | None = None,
                 metric: str = "accuracy", tolerance: float = 0.0):
        if metric not in METRICS:
            raise RegistryError(f"unknown gate metric {metric!r}; use one of {', '.join(METRICS)}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not math.isfinite(tolerance) \
                or tolerance < 0:
            raise RegistryError(f"the gate's tolerance must be a finite number >= 0, got {tolerance!r}")
        data = candidate.record["data"]
        self.candidate, self.split, self.metric, self.tolerance = candidate, split, metric, float(tolerance)
        self.lake, self.table = str(data["lake"]), str(data["table"])
        self.table_version = int(data["version"] if table_version is None else table_version)
        self._rows: tuple[np.ndarray, np.ndarray, list[str]] | None = None
        self._scores: dict[int, float] = {}

    @property
    def where(self) -> str:
        return f"{self.table}@{self.table_version}/{self.split}"

    def _load_rows(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(raw inputs, labels, label names)`` of the pinned split, read (and digest-checked) once."""
        if self._rows is None:
            from lepton_jax.data.transforms import input_array
            from lepton_jax.lake import Lake

            table = Lake(self.lake).table(self.table, self.table_version)
            examples = table.reader(self.split).read_all()
            schema = table.schema
            self._rows = examples[input_array(schema)], examples[schema["label_array"]], table.label_names
        return self._rows

    def score(self, entry: Any) -> float:
        """``entry``'s metric on the pinned rows (``lepton-jax eval``'s code path)."""
        if entry.version not in self._scores:
            from lepton_jax.eval.metrics import classification_summary
            from lepton_jax.serve.predictor import Predictor

            raw, labels, label_names = self._load_rows()
            predictor = Predictor.from_registry(entry)
            if predictor.task.name != "classification":
                raise RegistryError(f"the promotion gate compares classifiers; {entry.ref} is a "
                                    f"{predictor.task.name} model: promote it without --if-better")
            if predictor.label_names != label_names:
                raise RegistryError(f"cannot compare {entry.ref} on {self.where}: its label names "
                                    f"{predictor.label_names} differ from the table's {label_names}; promote without "
                                    "the gate or compare on a table both models classify")
            predictions = predictor.predict(raw, name=f"{self.where} ({entry.ref})")
            summary = classification_summary(labels, predictions["class"], predictor.label_names)
            self._scores[entry.version] = METRICS[self.metric](summary)
        return self._scores[entry.version]

    def compare(self, incumbent: Any | None, stage: str) -> dict[str, Any]:
        """The comparison record: metric, both versions and values, the pinned data, tolerance and decision."""
        value = self.score(self.candidate)
        held = None if incumbent is None else {"version": incumbent.version, "value": self.score(incumbent)}
        passed = held is None or value >= held["value"] - self.tolerance
        return {"metric": self.metric, "stage": stage, "candidate": {"version": self.candidate.version, "value": value},
                "incumbent": held, "lake": self.lake, "table": self.table, "table_version": self.table_version,
                "split": self.split, "num_examples": int(len(self._load_rows()[1])), "tolerance": self.tolerance,
                "decision": PROMOTE if passed else REFUSE}


def describe(comparison: dict[str, Any], name: str) -> str:
    """One line saying what the gate decided and why."""
    c, held, metric = comparison["candidate"], comparison["incumbent"], comparison["metric"]
    on = f"on {pinned_data(comparison)} ({comparison['num_examples']} rows)"
    if held is None:
        return f"{name}@{c['version']} {metric} {c['value']:.4f} {on}; stage {comparison['stage']} holds no version"
    verb = ">=" if comparison["decision"] == PROMOTE else "<"
    return (f"{name}@{c['version']} {metric} {c['value']:.4f} {verb} {comparison['stage']}'s {name}@{held['version']} "
            f"{held['value']:.4f} - tolerance {comparison['tolerance']:g} {on}")


def pinned_data(comparison: dict[str, Any]) -> str:
    """``table digits v1 split test``: the rows a comparison was made on."""
    return f"table {comparison['table']} v{comparison['table_version']} split {comparison['split']}"
