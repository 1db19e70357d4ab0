"""Classification over the table's integer labels: softmax cross-entropy, accuracy, per-class report."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax.models.functional import cross_entropy
from lepton_jax.tasks.base import Task


class Classification(Task):
    """Today's behaviour: logits over ``schema["label_names"]``; predictions are classes and probabilities."""

    name = "classification"
    step_metric_name = "accuracy"
    best_metric = ("accuracy", "max")

    @property
    def output_size(self) -> int:
        return len(self.schema["label_names"])

    def loss(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return cross_entropy(outputs, targets)

    def step_metric(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return jnp.mean(jnp.argmax(outputs, -1) == targets)

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        from lepton_jax.eval.metrics import summary_metrics

        return summary_metrics(outputs, targets)

    def report(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        from lepton_jax.eval.metrics import classification_summary, summary_metrics

        label_names = list(self.schema["label_names"])
        result = classification_summary(targets, outputs.argmax(-1), label_names)
        return {**result, "text": result["report_text"],
                "json": {k: result[k] for k in ("accuracy", "report", "confusion_matrix")},
                "summary": {"test_accuracy": result["accuracy"],
                            "test_loss": summary_metrics(outputs, targets)["loss"]},
                "headline": f"test accuracy {result['accuracy']:.4f}"}

    def predictions(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        return {"class": outputs.argmax(-1), "probability": np.asarray(jax.nn.softmax(outputs, axis=-1))}

    def edge_outputs(self) -> dict[str, dict[str, Any]]:
        return {"class": {"op": "argmax", "dtype": "int64"}, "probability": {"op": "softmax", "dtype": "float32"}}

    output_names = ("probabilities", "class", "label")  # the server builds these itself (serve/lifecycle.py)

    def serve_transform(self, outputs: jax.Array) -> jax.Array:
        return jax.nn.softmax(outputs.astype(np.float32), axis=-1)

    def drift_classes(self, outputs: np.ndarray) -> tuple[np.ndarray, int]:
        return outputs.argmax(-1), self.output_size
