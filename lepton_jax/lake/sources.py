"""Data sources for the lake. A source loads examples as numpy arrays plus labels; add your own by implementing
:class:`Source` (a ``name``, a ``uri`` and ``load()``)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np

from lepton_jax.errors import LakeError


@dataclasses.dataclass
class SourceData:
    """Examples from a source. ``arrays`` share axis 0; ``labels`` are int indices into ``label_names``."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray
    label_names: list[str]
    value_ranges: dict[str, tuple[float, float]]
    uri: str

    def digest(self) -> str:
        """sha256 over every array and the labels: identical source content gives an identical digest."""
        h = hashlib.sha256()
        for name in sorted(self.arrays):
            value = np.ascontiguousarray(self.arrays[name])
            h.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
            h.update(value.tobytes())
        h.update(np.ascontiguousarray(self.labels.astype(np.int64)).tobytes())
        h.update("\0".join(self.label_names).encode())
        return h.hexdigest()


class Source(Protocol):
    name: str
    uri: str

    def load(self) -> SourceData: ...


class DigitsSource:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16); ships with the package."""

    name = "digits"
    uri = "sklearn://datasets/load_digits"

    def load(self) -> SourceData:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = bunch.images
        if not np.array_equal(images, np.round(images)):
            raise LakeError("sklearn digits are expected to hold integer pixel values 0..16")
        return SourceData(
            arrays={"image": images.astype(np.uint8)[..., None]},
            labels=bunch.target.astype(np.int64),
            label_names=[str(n) for n in bunch.target_names],
            value_ranges={"image": (0.0, 16.0)},
            uri=self.uri,
        )


class NpzSource:
    """A ``.npz`` file with a feature array and an integer label array."""

    name = "npz"

    def __init__(self, path: str | Path, feature_key: str = "x", label_key: str = "y",
                 label_names: list[str] | None = None, value_range: tuple[float, float] | None = None):
        self.path = Path(path)
        self.uri = f"file://{self.path.resolve()}"
        self.feature_key, self.label_key = feature_key, label_key
        self.label_names, self.value_range = label_names, value_range

    def load(self) -> SourceData:
        if not self.path.is_file():
            raise LakeError(f"npz source {self.path} does not exist")
        try:
            with np.load(self.path, allow_pickle=False) as data:
                missing = {self.feature_key, self.label_key} - set(data.files)
                if missing:
                    raise LakeError(f"npz source {self.path} lacks {sorted(missing)}; it has {data.files}")
                features, labels = data[self.feature_key], data[self.label_key]
        except (OSError, ValueError) as e:
            raise LakeError(f"cannot read npz source {self.path}: {e}") from e
        if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
            raise LakeError(f"npz source {self.path}: labels {self.label_key!r} must be a 1-D integer array, "
                            f"got {labels.dtype} with shape {labels.shape}")
        names = self.label_names or [str(i) for i in range(int(labels.max()) + 1)]
        value_range = self.value_range or (float(np.nanmin(features)), float(np.nanmax(features)))
        return SourceData({"image": features}, labels.astype(np.int64), names, {"image": value_range}, self.uri)


def make_source(spec: str) -> Source:
    """``digits`` or ``npz:PATH``."""
    if spec == "digits":
        return DigitsSource()
    if spec.startswith("npz:"):
        return NpzSource(spec[4:])
    raise LakeError(f"unknown source {spec!r}; use 'digits' or 'npz:PATH'")
