"""Regression of a float target vector: MSE on standardised targets; MAE, RMSE and R² per target in target units.

The table names its target array in ``schema["target_arrays"]`` (a float (N, T) array; ``SklearnSource("diabetes")``
is one). The model predicts standardised targets ``(y - mean) / std`` with the train split's per-column mean/std,
which the run's schema records under ``target_stats`` (copied into the registry record), so predictions come back
in target units everywhere (eval, predict, serve) without the run directory."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax.data.transforms import target_arrays
from lepton_jax.errors import ConfigError
from lepton_jax.tasks.base import Task


class Regression(Task):
    name = "regression"
    step_metric_name = "mae"  # in standardised units
    best_metric = ("rmse", "min")
    needs, needs_example = "a float target array", "sklearn:diabetes"

    @classmethod
    def fit_schema(cls, schema: dict[str, Any], train_stats: dict[str, Any]) -> dict[str, Any]:
        names = target_arrays(schema)
        name = names[0] if names else None
        if name is None or name not in train_stats:
            return schema  # check_schema names the problem
        columns = train_stats[name].get("columns") or {"mean": [train_stats[name]["mean"]],
                                                       "std": [train_stats[name]["std"]]}
        std = [float(s) if s > 0 else 1.0 for s in columns["std"]]
        return {**schema, "target_stats": {"array": name, "mean": [float(m) for m in columns["mean"]], "std": std}}

    def check_schema(self) -> None:
        name, _ = self.target()
        if "target_stats" not in self.schema:
            raise ConfigError(f"task 'regression': the schema has no target_stats for {name!r} (the train split's "
                              "statistics are missing); re-ingest the table")
        stats = self.schema["target_stats"]
        self.mean = np.asarray(stats["mean"], np.float32)
        self.std = np.asarray(stats["std"], np.float32)
        self.columns = list(self.schema["arrays"][name].get("columns") or [f"target_{i}"
                                                                           for i in range(len(self.mean))])

    @property
    def output_size(self) -> int:
        return int(len(self.mean))

    def _standardise(self, targets):
        return (targets - self.mean) / self.std

    def loss(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return jnp.mean((outputs - self._standardise(targets)) ** 2)

    def step_metric(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return jnp.mean(jnp.abs(outputs - self._standardise(targets)))

    def values(self, outputs: np.ndarray) -> np.ndarray:
        """Model outputs -> targets in their own units."""
        return (np.asarray(outputs, np.float32) * self.std + self.mean).astype(np.float32)

    def metrics(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        """``loss`` (MSE, standardised), then MAE, RMSE and R² in target units: averaged over targets, and per
        target (``mae_<name>``...) when there are several."""
        values, targets = self.values(outputs), np.asarray(targets, np.float64)
        err = values - targets
        mae, rmse = np.abs(err).mean(0), np.sqrt((err ** 2).mean(0))
        var = ((targets - targets.mean(0)) ** 2).sum(0)
        r2 = 1.0 - (err ** 2).sum(0) / np.where(var > 0, var, 1.0)
        out = {"loss": float(np.mean((np.asarray(outputs, np.float64) - self._standardise(targets)) ** 2)),
               "mae": float(mae.mean()), "rmse": float(rmse.mean()), "r2": float(r2.mean())}
        if len(self.columns) > 1:
            for i, col in enumerate(self.columns):
                out |= {f"mae_{col}": float(mae[i]), f"rmse_{col}": float(rmse[i]), f"r2_{col}": float(r2[i])}
        return out

    def report(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
        out = super().report(outputs, targets)
        m = out["json"]
        return {**out, "headline": f"test RMSE {m['rmse']:.4g}  MAE {m['mae']:.4g}  R² {m['r2']:.4f}"}

    def predictions(self, outputs: np.ndarray) -> dict[str, np.ndarray]:
        return {"value": self.values(outputs)}

    def edge_outputs(self) -> dict[str, dict[str, Any]]:
        return {"value": {"op": "affine", "scale": self.std.tolist(), "offset": self.mean.tolist(), "dtype": "float32",
                          "names": self.columns}}

    output_names = ("value",)

    def serve_transform(self, outputs: jax.Array) -> jax.Array:
        return outputs.astype(jnp.float32) * self.std + self.mean
