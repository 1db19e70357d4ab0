"""Runs an exported edge artifact with jax and numpy only: no lepton_jax, no Flax, no model code.

This file is copied into every artifact directory as ``edge_runner.py``, so an edge node needs the directory and
``pip install jax numpy`` (plus ``flatbuffers``)::

    from edge_runner import EdgeModel            # or: python edge_runner.py ARTIFACT_DIR examples.npy
    model = EdgeModel.load("artifact_dir")
    out = model.predict(raw_examples)            # {"class": (N,), "probability": (N, C)}

Inputs are raw examples in the training table's units; they are checked against the schema in ``manifest.json``.
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


class ArtifactError(ValueError):
    """The artifact is incomplete or corrupt, or an input does not match its schema."""


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
        x = self.validate(raw)
        if x.shape[0] == 0:
            return np.zeros((0, len(self.label_names)), np.float32)
        return np.asarray(self.exported.call(self.weights, x))

    def predict(self, raw: Any) -> dict[str, np.ndarray]:
        logits = self.logits(raw)
        z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return {"class": logits.argmax(-1), "probability": z / z.sum(-1, keepdims=True)}


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
    for i, (c, p) in enumerate(zip(out["class"], out["probability"], strict=True)):
        print(f"[{i}] {model.label_names[c]}  p={p.max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
