"""A jitted, batch-sharded predictor restored from a run directory's best checkpoint or a registry record.

Inputs are raw examples in the units of the lake table the model was trained on (for digits: 8x8 values in
0..16); the predictor validates them against the table schema saved with the run and applies the same
preprocessing as training (:func:`lepton_jax.data.prepare_batch`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lepton_jax.checkpoint import read_run, restore_params
from lepton_jax.data.transforms import INPUT, input_array, input_spec, out_of_range, prepare_batch
from lepton_jax.errors import InputError
from lepton_jax.models.functional import make_predict
from lepton_jax.parallel import batch_sharding, make_mesh, replicated
from lepton_jax.parallel.mesh import data_parallel_size, mesh_config
from lepton_jax.tasks import Classification, Task

__all__ = ["Predictor", "load_npy", "read_run"]


class Predictor:
    """Predicts (the task's outputs) for raw examples in fixed-size, device-sharded batches (one compiled shape)."""

    def __init__(self, graphdef: nnx.GraphDef, params: Any, *, schema: dict[str, Any], mesh: jax.sharding.Mesh,
                 batch_size: int = 256, step: int | None = None, task: Task | None = None):
        self.graphdef, self.schema, self.mesh, self.step = graphdef, schema, mesh, step
        self.task = Classification(schema) if task is None else task  # what the outputs mean (lepton_jax.tasks)
        self.label_names = list(schema["label_names"])
        dp = data_parallel_size(mesh)
        self.batch_size = batch_size + (-batch_size) % dp
        self._sharding = batch_sharding(mesh)
        self.params = params
        self._predict = jax.jit(make_predict(graphdef), in_shardings=(replicated(mesh), self._sharding),
                                out_shardings=self._sharding)

    @classmethod
    def from_workdir(cls, workdir: str | Path, *, step: int | None = None, devices: list | None = None,
                     batch_size: int = 256) -> Predictor:
        """Restores the best (or given) checkpoint of a finished or running training run."""
        workdir = Path(workdir)
        _, run_info = read_run(workdir)
        mesh = make_mesh(mesh_config({"data": -1}), devices)
        built, params, step = restore_params(workdir, step, mesh)
        return cls(built.graphdef, params, schema=run_info["data"]["schema"], mesh=mesh, batch_size=batch_size,
                   step=step, task=built.task)

    @classmethod
    def from_registry(cls, entry: Any, *, devices: list | None = None, batch_size: int = 256) -> Predictor:
        """A registered model version (:class:`lepton_jax.serve.registry.ModelVersion`): model and parameters come
        from the record and the lake alone, not from the run directory it was registered from."""
        mesh = make_mesh(mesh_config({"data": -1}), devices)
        built, params = entry.restore(mesh)
        return cls(built.graphdef, params, schema=entry.schema, mesh=mesh, batch_size=batch_size, step=entry.step,
                   task=built.task)

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(input_spec(self.schema)["example_shape"])

    def validate(self, raw: np.ndarray, name: str = "input") -> np.ndarray:
        """Checks shape, dtype and values against the training table's schema; returns (N, *example_shape)."""
        raw = np.asarray(raw)
        shape = self.example_shape
        if raw.dtype.kind not in "uif":
            raise InputError(f"{name}: dtype {raw.dtype} is not numeric; expected integers or floats in the "
                             f"range {input_spec(self.schema)['value_range']}")
        if raw.shape[1:] == shape[:-1] and shape[-1] == 1:
            raw = raw[..., None]
        if raw.ndim != len(shape) + 1 or raw.shape[1:] != shape:
            raise InputError(f"{name}: shape {raw.shape} does not match the model's input; expected "
                             f"(N, {', '.join(map(str, shape))})")
        if raw.dtype.kind == "f" and not np.isfinite(raw).all():
            bad = int((~np.isfinite(raw.reshape(raw.shape[0], -1))).any(axis=1).sum())
            raise InputError(f"{name}: {bad} example(s) contain NaN or inf")
        why = out_of_range(raw, input_spec(self.schema))
        if why is not None:
            raise InputError(f"{name}: {why} (raw units of the lake table)")
        return raw

    def logits(self, raw: np.ndarray, name: str = "input") -> np.ndarray:
        raw = self.validate(raw, name)
        inputs = prepare_batch({input_array(self.schema): raw}, self.schema)[INPUT]
        outputs = []
        for start in range(0, inputs.shape[0], self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            pad = self.batch_size - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            out = self._predict(self.params, jax.device_put(chunk, self._sharding))
            outputs.append(np.asarray(out)[: self.batch_size - pad])
        if not outputs:
            return np.zeros((0, *self.task.output_shape), np.float32)
        return np.concatenate(outputs)

    def predict(self, raw: np.ndarray, name: str = "input") -> dict[str, np.ndarray]:
        """The task's predictions: class indices and softmax probabilities (``class``, ``probability``) for
        classification, ``value`` in target units for regression."""
        return self.task.predictions(self.logits(raw, name))


def load_npy(path: str | Path) -> np.ndarray:
    """Loads a ``.npy`` file with a clear error for missing, pickled or malformed files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise InputError(f"input file {path} is not a .npy file (no NumPy header); save arrays with numpy.save")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"input file {path} is not a valid .npy array of numbers: {e}") from e
