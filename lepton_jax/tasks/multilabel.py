"""Multi-label classification over a multi-hot target array: sigmoid binary cross-entropy; micro/macro F1 and mAP.

The table names its multi-hot target (N, K) in ``schema["target_arrays"]`` (values 0/1; its ``columns`` are the
label names), e.g. ``SklearnSource("digits_attributes")``. A label is predicted when its sigmoid probability is at
least 0.5."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import metrics as skm

from lepton_jax.tasks.base import Task

THRESHOLD = 0.5


class MultiLabel(Task):
    name = "multilabel"
    step_metric_name = "label_accuracy"  # the fraction of (example, label) pairs right at the threshold
    best_metric = ("micro_f1", "max")
    output_names = ("probabilities",)
    needs, needs_example = "a multi-hot target array", "sklearn:digits_attributes"

    def check_schema(self) -> None:
        _, spec = self.target()
        self.columns = list(spec.get("columns") or [f"label_{i}" for i in range(int(spec["example_shape"][-1]))])

    @property
    def output_size(self) -> int:
        return len(self.columns)

    def loss(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return optax.sigmoid_binary_cross_entropy(outputs, targets).mean()

    def step_metric(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return jnp.mean((outputs >= 0) == (targets > 0.5))  # sigmoid(x) >= 0.5 <=> x >= 0

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        truth = np.asarray(targets) > 0.5
        predicted = np.asarray(outputs) >= 0
        scores = np.asarray(jax.nn.sigmoid(jnp.asarray(outputs)))
        loss = float(optax.sigmoid_binary_cross_entropy(jnp.asarray(outputs), jnp.asarray(truth, jnp.float32)).mean())
        present = truth.any(0) & ~truth.all(0)  # average precision is defined for labels with both outcomes
        return {"loss": loss, "label_accuracy": float(np.mean(predicted == truth)),
                "micro_f1": float(skm.f1_score(truth, predicted, average="micro", zero_division=0)),
                "macro_f1": float(skm.f1_score(truth, predicted, average="macro", zero_division=0)),
                "map": float(skm.average_precision_score(truth[:, present], scores[:, present], average="macro"))
                if present.any() else float("nan")}

    def report(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        out = super().report(outputs, targets)
        truth, predicted = np.asarray(targets) > 0.5, np.asarray(outputs) >= 0
        text = skm.classification_report(truth, predicted, target_names=self.columns, digits=4, zero_division=0)
        m = out["json"]
        return {**out, "text": text + "\n" + out["text"],
                "json": {**m, "report": skm.classification_report(truth, predicted, target_names=self.columns,
                                                                  output_dict=True, zero_division=0)},
                "headline": f"test micro-F1 {m['micro_f1']:.4f}  macro-F1 {m['macro_f1']:.4f}  mAP {m['map']:.4f}"}

    def predictions(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        probabilities = np.asarray(jax.nn.sigmoid(jnp.asarray(outputs)), np.float32)
        return {"probabilities": probabilities, "labels": (probabilities >= THRESHOLD).astype(np.int32)}

    def edge_outputs(self) -> dict[str, dict[str, Any]]:
        return {"probabilities": {"op": "sigmoid", "dtype": "float32", "names": self.columns},
                "labels": {"op": "sigmoid_at_least", "threshold": THRESHOLD, "dtype": "int32", "names": self.columns}}

    def serve_transform(self, outputs: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(outputs.astype(jnp.float32))
