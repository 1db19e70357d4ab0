"""The task interface (a plain class; subclass it or write one with the same methods)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from lepton_jax.data.transforms import target_arrays
from lepton_jax.errors import ConfigError


class Task:
    """A task over a table ``schema``.

    Jittable (inside the train step): :meth:`loss` and :meth:`step_metric`, over the model's outputs and the batch's
    ``label`` entry (the table's label array, or its target array when the schema names ``target_arrays``).
    Host side (NumPy): :meth:`metrics` for evaluation (the dev metrics are logged as ``dev_<name>``),
    :meth:`report` for the test split, :meth:`predictions` for predict/serve."""

    name = "task"
    step_metric_name = "accuracy"  # the train-step metric logged beside the loss
    best_metric = ("accuracy", "max")  # the default best-checkpoint metric (without the dev_ prefix), direction

    needs = ""  # a task over a target array: what that array must be, for the error when the table has none
    needs_example = ""  # a bundled source whose table has one

    def __init__(self, schema: dict[str, Any]):
        self.schema = schema
        self.check_schema()

    def _missing(self, method: str) -> NotImplementedError:
        return NotImplementedError(f"task {self.name!r} ({type(self).__module__}.{type(self).__qualname__}) does not "
                                   f"define {method!r}, which every task needs (see lepton_jax.tasks.base.Task)")

    def target(self) -> tuple[str, dict[str, Any]]:
        """The table's (first) target array: its name and schema entry; a :class:`ConfigError` saying what the task
        needs (``needs``, ``needs_example``) when the table holds none (e.g. one ingested before targets existed)."""
        names = target_arrays(self.schema)
        if not names:
            raise ConfigError(f"task {self.name!r} needs a table with {self.needs} (schema 'target_arrays'); ingest "
                              f"one from a source that names its targets, e.g. --source {self.needs_example}")
        return names[0], self.schema["arrays"][names[0]]

    @classmethod
    def fit_schema(cls, schema: dict[str, Any], train_stats: dict[str, Any]) -> dict[str, Any]:
        """The run's schema from the table's and the train split's statistics (default: unchanged)."""
        return schema

    def check_schema(self) -> None:
        """Raises a :class:`lepton_jax.errors.ConfigError` when the table lacks what the task needs."""

    @property
    def output_size(self) -> int:
        """The model's output width per example (required)."""
        raise self._missing("output_size")

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of one example's model output (default: ``(output_size,)``; dense targets: ``(H, W, K)``)."""
        return (self.output_size,)

    def loss(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        """The scalar training loss of a batch (required; jittable)."""
        raise self._missing("loss")

    def step_metric(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        """The scalar ``step_metric_name`` of a batch, logged beside the loss (required; jittable)."""
        raise self._missing("step_metric")

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        """Evaluation metrics over a whole split (required; must include ``loss``)."""
        raise self._missing("metrics")

    def report(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        """The test report: ``text`` (report.txt), ``json`` (report.json), ``summary`` (``test_*`` metrics for
        summary.json), ``headline`` (one line for the console)."""
        metrics = self.metrics(outputs, targets)
        text = "\n".join(f"{k}: {v:.6g}" for k, v in metrics.items())
        return {"text": text, "json": metrics, "summary": {f"test_{k}": v for k, v in metrics.items()},
                "headline": text.replace("\n", "  ")}

    def predictions(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        """Model outputs (N, output_size) -> named prediction arrays (predict, eval)."""
        return {"output": outputs}

    def edge_outputs(self) -> dict[str, dict[str, Any]]:
        """How an edge artifact (``lepton-jax export``) turns the model's raw outputs into :meth:`predictions`, as
        JSON for its manifest: prediction name -> ``{"op", "dtype", ...}`` with an op of the artifact's runner
        (``identity``, ``softmax``, ``sigmoid``, ``argmax``, ``sigmoid_at_least`` with ``threshold``, ``affine``
        with ``scale`` and ``offset``; :func:`lepton_jax.serve.edge.postprocess`). Export checks that these
        reproduce :meth:`predictions` and refuses the task when they do not. Default: the raw outputs."""
        return {"output": {"op": "identity", "dtype": "float32"}}

    # serving (KServe v2): the server applies ``serve_transform`` inside its jitted function and answers with one
    # FP32 tensor per name in ``output_names`` from ``serve_outputs``
    output_names: tuple[str, ...] = ("output",)

    def serve_transform(self, outputs: jax.Array) -> jax.Array:
        """Jittable: model outputs -> the served array (default: unchanged)."""
        return outputs

    def serve_outputs(self, served: np.ndarray) -> dict[str, np.ndarray]:
        """The served array -> the response tensors (FP32, first axis the batch), named as ``output_names``."""
        return {self.output_names[0]: served}

    def drift_classes(self, outputs: np.ndarray) -> tuple[np.ndarray, int]:
        """Prediction buckets for drift monitoring and their count: one bucket by default, so drift monitors
        the inputs only (classification: the predicted classes). ``outputs`` are the model's raw outputs at
        registration and the served array (:meth:`serve_transform`'s) in the server."""
        return np.zeros(outputs.shape[0], np.int64), 1
