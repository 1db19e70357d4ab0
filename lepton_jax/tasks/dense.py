"""Dense targets (segmentation): one class per input pixel; per-pixel cross-entropy, pixel accuracy and mean IoU.

The table names its per-pixel class map ``(N, H, W)`` (integer class ids ``0 .. K-1``, with ``K - 1`` the top of its
``value_range``) in ``schema["target_arrays"]``, e.g. ``SklearnSource("digits_strokes")``; the model (e.g. ``fcn``)
returns logits ``(N, H, W, K)``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lepton_jax.tasks.base import Task


class Dense(Task):
    name = "dense"
    step_metric_name = "pixel_accuracy"
    best_metric = ("mean_iou", "max")
    output_names = ("probabilities",)
    needs, needs_example = "a per-pixel class map", "sklearn:digits_strokes"

    def check_schema(self) -> None:
        _, spec = self.target()
        self.shape = tuple(int(d) for d in spec["example_shape"])
        self.num_classes = int(spec["value_range"][1]) + 1

    @property
    def output_size(self) -> int:
        return self.num_classes

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (*self.shape, self.num_classes)

    def loss(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(outputs, targets.astype(jnp.int32)).mean()

    def step_metric(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return jnp.mean(jnp.argmax(outputs, -1) == targets.astype(jnp.int32))

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        truth = np.asarray(targets).astype(np.int64)
        predicted = np.asarray(outputs).argmax(-1)
        loss = float(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(outputs), jnp.asarray(truth)).mean())
        ious = {}
        for k in range(self.num_classes):
            union = np.sum((truth == k) | (predicted == k))
            if union:  # a class absent from both truth and prediction has no IoU
                ious[k] = float(np.sum((truth == k) & (predicted == k)) / union)
        return {"loss": loss, "pixel_accuracy": float(np.mean(predicted == truth)),
                "mean_iou": float(np.mean(list(ious.values()))) if ious else float("nan"),
                **{f"iou_{k}": v for k, v in ious.items()}}

    def report(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        out = super().report(outputs, targets)
        m = out["json"]
        return {**out, "headline": f"test mean IoU {m['mean_iou']:.4f}  pixel accuracy {m['pixel_accuracy']:.4f}"}

    def predictions(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        return {"mask": np.asarray(outputs).argmax(-1).astype(np.int32),
                "probabilities": np.asarray(jax.nn.softmax(jnp.asarray(outputs), axis=-1), np.float32)}

    def edge_outputs(self) -> dict[str, dict[str, Any]]:
        return {"mask": {"op": "argmax", "dtype": "int32"}, "probabilities": {"op": "softmax", "dtype": "float32"}}

    def serve_transform(self, outputs: jax.Array) -> jax.Array:
        return jax.nn.softmax(outputs.astype(jnp.float32), axis=-1)
