"""Runs an exported edge artifact with jax and numpy only: no lepton_jax, no Flax, no model code.

This file is copied into every artifact directory as ``edge_runner.py``, so an edge node needs the directory and
``pip install jax numpy`` (plus ``flatbuffers``)::

    from edge_runner import EdgeModel            # or: python edge_runner.py ARTIFACT_DIR examples.npy
    model = EdgeModel.load("artifact_dir")
    out = model.predict(raw_examples)            # classifier: {"class": (N,), "probability": (N, C)}

Inputs are raw examples in the training table's units; they are checked against the schema in ``manifest.json``.
The exported function returns the model's raw outputs (``logits``); ``manifest["task"]["outputs"]`` (a list, in
order) records how :func:`postprocess` turns them into the task's predictions, the same arrays ``lepton-jax
predict`` returns: a classifier's ``class``/``probability``, a regression's ``value`` (target units), a
multi-label model's ``probabilities``/``labels``, a dense model's per-pixel ``mask``/``probabilities``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "lepton-edge/1"


# artifacts written before tasks were recorded hold classifiers
CLASSIFICATION = {"name": "classification", "outputs": [{"name": "class", "op": "argmax", "dtype": "int64"},
                                                        {"name": "probability", "op": "softmax", "dtype": "float32"}]}


class ArtifactError(ValueError):
    """The artifact is incomplete or corrupt, or an input does not match its schema."""


def postprocess(outputs: list[dict[str, Any]], logits: np.ndarray) -> dict[str, np.ndarray]:
    """The predictions ``outputs`` (``[{"name", "op", "dtype", ...}]``, from the manifest) make of raw model outputs,
    in that order.

    Ops: ``identity``; ``softmax`` and ``argmax`` over the last axis; ``sigmoid``; ``sigmoid_at_least``
    (``sigmoid >= threshold``, as 0/1); ``affine`` (``logits * scale + offset``, per entry of the last axis)."""
    import jax

    logits = np.asarray(logits, np.float32)
    result = {}
    for spec in outputs:
        name, op = spec["name"], spec["op"]
        if op == "identity":
            value = logits
        elif op == "softmax":
            value = np.asarray(jax.nn.softmax(logits, axis=-1))
        elif op == "argmax":
            value = logits.argmax(-1)
        elif op == "sigmoid":
            value = np.asarray(jax.nn.sigmoid(logits))
        elif op == "sigmoid_at_least":
            value = np.asarray(jax.nn.sigmoid(logits), np.float32) >= spec["threshold"]
        elif op == "affine":
            value = logits * np.asarray(spec["scale"], np.float32) + np.asarray(spec["offset"], np.float32)
        else:
            raise ArtifactError(f"output {name!r}: unknown op {op!r} (this runner knows identity, softmax, argmax, "
                                "sigmoid, sigmoid_at_least, affine)")
        result[name] = np.asarray(value).astype(spec.get("dtype", "float32"))
    return result


class EdgeModel:
    """A deserialized ``jax.export`` function and its weights; the batch dimension is symbolic."""

    def __init__(self, directory: str | Path, *, verify: bool = True):
        from jax import export

        self.directory = Path(directory)
        try:
            self.manifest: dict[str, Any] = json.loads((self.directory / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{self.directory} is not an edge artifact (unreadable {MANIFEST}: {e})") from e
        if self.manifest.get("format") != FORMAT:
            raise ArtifactError(f"{self.directory / MANIFEST} is not a {FORMAT} manifest")
        if verify:
            for name, meta in self.manifest["files"].items():
                digest = hashlib.sha256((self.directory / name).read_bytes()).hexdigest()
                if digest != meta["sha256"]:
                    raise ArtifactError(f"{self.directory / name} does not match the sha256 in the manifest")
        self.exported = export.deserialize(bytearray((self.directory / self.manifest["function"]).read_bytes()))
        with np.load(self.directory / self.manifest["weights"], allow_pickle=False) as npz:
            self.weights = {key: npz[key] for key in npz.files}
        spec = self.manifest["input"]
        self.example_shape = tuple(spec["example_shape"])
        self.value_range = tuple(spec["value_range"])
        columns = spec.get("column_ranges")  # tabular inputs: one [lo, hi] per column of the last axis
        self.column_ranges = None if columns is None else np.asarray(columns, np.float64).reshape(-1, 2)
        self.label_names = list(self.manifest["label_names"])
        self.task: dict[str, Any] = self.manifest.get("task", CLASSIFICATION)
        self.output_shape = tuple(self.manifest["output"]["shape"][1:])  # one example's raw outputs

    @classmethod
    def load(cls, directory: str | Path, *, verify: bool = True) -> EdgeModel:
        return cls(directory, verify=verify)

    def validate(self, raw: Any) -> np.ndarray:
        """Checks dtype, shape, finiteness and range; returns float32 (N, *example_shape)."""
        x = np.asarray(raw)
        if x.dtype.kind not in "uif":
            raise ArtifactError(f"input dtype {x.dtype} is not numeric; expected numbers in {self.value_range}")
        shape = self.example_shape
        if x.shape[1:] == shape[:-1] and shape[-1] == 1:
            x = x[..., None]
        if x.ndim != len(shape) + 1 or x.shape[1:] != shape:
            raise ArtifactError(f"input shape {x.shape} does not match; expected (N, {', '.join(map(str, shape))})")
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise ArtifactError("input contains NaN or inf")
        lo, hi = self.value_range
        if x.size and (x.min() < lo or x.max() > hi):
            raise ArtifactError(f"input values span [{x.min()}, {x.max()}]; expected [{lo}, {hi}]")
        if self.column_ranges is not None and x.size:
            cols = x.reshape(-1, self.column_ranges.shape[0])
            bad = np.flatnonzero((cols.min(0) < self.column_ranges[:, 0]) | (cols.max(0) > self.column_ranges[:, 1]))
            if bad.size:
                c = int(bad[0])
                raise ArtifactError(f"input column {c} spans [{cols[:, c].min()}, {cols[:, c].max()}]; expected "
                                    f"[{self.column_ranges[c, 0]}, {self.column_ranges[c, 1]}]")
        return x

    def logits(self, raw: Any) -> np.ndarray:
        """The model's raw outputs (N, *output_shape)."""
        x = self.validate(raw)
        if x.shape[0] == 0:
            return np.zeros((0, *self.output_shape), np.float32)
        return np.asarray(self.exported.call(self.weights, x))

    def predict(self, raw: Any) -> dict[str, np.ndarray]:
        """The task's predictions, as ``lepton-jax predict`` returns them (see :func:`postprocess`)."""
        return postprocess(self.task["outputs"], self.logits(raw))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python edge_runner.py ARTIFACT_DIR EXAMPLES.npy", file=sys.stderr)
        return 2
    try:
        model = EdgeModel.load(argv[0])
        out = model.predict(np.load(argv[1], allow_pickle=False))
    except (OSError, ValueError) as e:  # a missing or unreadable file, a wrong artifact or input (ArtifactError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "class" in out and "probability" in out:  # a classifier
        for i, (c, p) in enumerate(zip(out["class"], out["probability"], strict=True)):
            print(f"[{i}] {model.label_names[c]}  p={p.max():.3f}")
        return 0
    name, values = next(iter(out.items()))  # other tasks: their first output (value, probabilities, mask)
    others = "".join(f"; {k} {v.dtype} {list(v.shape)}" for k, v in list(out.items())[1:])
    print(f"{model.task['name']}: {name} {values.dtype} {list(values.shape)}{others} (all: EdgeModel.predict)")
    for i, row in enumerate(values):
        print(f"[{i}] {np.array2string(np.atleast_1d(row), precision=4, max_line_width=200)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
