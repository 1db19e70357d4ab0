"""Data sources for the lake. A source loads examples as numpy arrays plus labels; add your own by implementing
:class:`Source` (a ``name``, a ``uri`` and ``load()`` returning :class:`SourceData`).

A source reports examples it cannot even turn into arrays (an unreadable image, an image of another shape) in
``SourceData.rejected`` instead of dropping them, so ingest puts them in the quarantine with their reason; it records
its own preprocessing (decoding, resizing, windowing) with parameters in ``SourceData.transforms`` for the lineage.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lepton_jax import plugins
from lepton_jax.errors import LakeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class SourceData:
    """Examples from a source. ``arrays`` share axis 0; ``labels`` are int indices into ``label_names``.

    Optional: ``ids`` names each example (file, rows) for error messages and the quarantine; ``rejected`` lists
    examples the source could not load (``{"id", "reason", "detail"}``); ``transforms`` the source's preprocessing
    steps with their parameters; ``split`` a split name per example when the source assigns splits itself.
    """

    arrays: dict[str, np.ndarray]
    labels: np.ndarray
    label_names: list[str]
    value_ranges: dict[str, tuple[float, float]]
    uri: str
    ids: list[str] | None = None
    rejected: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    transforms: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    split: np.ndarray | None = None

    def example_id(self, i: int) -> str:
        return self.ids[i] if self.ids is not None else f"example {i}"

    def digest(self) -> str:
        """sha256 over every array, the labels and (when present) rejections, transforms and split assignment:
        identical source content gives an identical digest."""
        h = hashlib.sha256()
        for name in sorted(self.arrays):
            value = np.ascontiguousarray(self.arrays[name])
            h.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
            h.update(value.tobytes())
        h.update(np.ascontiguousarray(self.labels.astype(np.int64)).tobytes())
        h.update("\0".join(self.label_names).encode())
        if self.rejected or self.transforms:
            h.update(json.dumps([self.rejected, self.transforms], sort_keys=True).encode())
        if self.split is not None:
            h.update("\0".join(str(s) for s in self.split).encode())
        return h.hexdigest()


class Source(Protocol):
    name: str
    uri: str

    def load(self) -> SourceData: ...


_SKLEARN = ("digits", "iris", "wine", "breast_cancer")


class SklearnSource:
    """One of scikit-learn's bundled datasets (``digits``, ``iris``, ``wine``, ``breast_cancer``); no download.

    ``digits`` gives ``image`` (N, 8, 8, 1) uint8 in 0..16; the others give ``features`` (N, F) float32.
    """

    def __init__(self, dataset: str = "digits"):
        if dataset not in _SKLEARN:
            raise LakeError(f"unknown scikit-learn dataset {dataset!r}; choose one of {', '.join(_SKLEARN)}")
        self.dataset = dataset
        self.name = "digits" if dataset == "digits" else f"sklearn:{dataset}"
        self.uri = f"sklearn://datasets/load_{dataset}"

    def load(self) -> SourceData:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, f"load_{self.dataset}")()
        names = [str(n) for n in bunch.target_names]
        labels = bunch.target.astype(np.int64)
        if self.dataset == "digits":
            images = bunch.images
            if not np.array_equal(images, np.round(images)):
                raise LakeError("sklearn digits are expected to hold integer pixel values 0..16")
            return SourceData({"image": images.astype(np.uint8)[..., None]}, labels, names,
                              {"image": (0.0, 16.0)}, self.uri)
        features = bunch.data.astype(np.float32)
        return SourceData({"features": features}, labels, names,
                          {"features": (float(features.min()), float(features.max()))}, self.uri)


class DigitsSource(SklearnSource):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16); ships with the package."""

    def __init__(self):
        super().__init__("digits")


class NpzSource:
    """A ``.npz`` file with a feature array and an integer label array (and optionally a split name per example)."""

    name = "npz"

    def __init__(self, path: str | Path, feature_key: str = "x", label_key: str = "y",
                 label_names: list[str] | None = None, value_range: tuple[float, float] | None = None,
                 split_key: str | None = None):
        self.path = Path(path)
        self.uri = f"file://{self.path.resolve()}"
        self.feature_key, self.label_key, self.split_key = feature_key, label_key, split_key
        self.label_names, self.value_range = label_names, value_range

    def load(self) -> SourceData:
        if not self.path.is_file():
            raise LakeError(f"npz source {self.path} does not exist")
        keys = {self.feature_key, self.label_key} | ({self.split_key} if self.split_key else set())
        try:
            with np.load(self.path, allow_pickle=False) as data:
                missing = keys - set(data.files)
                if missing:
                    raise LakeError(f"npz source {self.path} lacks {sorted(missing)}; it has {data.files}")
                features, labels = data[self.feature_key], data[self.label_key]
                split = data[self.split_key].astype(str) if self.split_key else None
        except (OSError, ValueError) as e:
            raise LakeError(f"cannot read npz source {self.path} (ragged or object arrays are not supported; "
                            f"every example must have one shape): {e}") from e
        if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
            raise LakeError(f"npz source {self.path}: labels {self.label_key!r} must be a 1-D integer array, "
                            f"got {labels.dtype} with shape {labels.shape}")
        if features.ndim < 2:
            raise LakeError(f"npz source {self.path}: features {self.feature_key!r} must have an example axis and "
                            f"at least one more, got shape {features.shape}")
        names = self.label_names or [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]
        finite = features[np.isfinite(features)] if np.issubdtype(features.dtype, np.floating) else features
        value_range = self.value_range or ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0))
        return SourceData({"image": features}, labels.astype(np.int64), names, {"image": value_range}, self.uri,
                          split=split)


class ImageFolderSource:
    """A folder of images with one subfolder per label: ``ROOT/<label>/<file>.png`` (any format Pillow reads).

    Images are converted to ``mode`` (``L``: grey, one channel; ``RGB``: three) and, with ``size=(width, height)``,
    resized (bilinear). Without ``size`` every image must have the shape most of them have; the others, and files
    Pillow cannot read, are rejected into the quarantine with their file named.
    """

    name = "images"

    def __init__(self, root: str | Path, size: tuple[int, int] | None = None, mode: str = "L"):
        if mode not in ("L", "RGB"):
            raise LakeError(f"image mode must be 'L' or 'RGB', got {mode!r}")
        self.root, self.size, self.mode = Path(root), (tuple(int(s) for s in size) if size else None), mode
        self.uri = f"file://{self.root.resolve()}"

    def load(self) -> SourceData:
        from PIL import Image, UnidentifiedImageError

        if not self.root.is_dir():
            raise LakeError(f"image folder {self.root} does not exist")
        label_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not label_dirs:
            raise LakeError(f"image folder {self.root} has no label subfolders (expected ROOT/<label>/<image>)")
        images, labels, ids, rejected = [], [], [], []
        for label, folder in enumerate(label_dirs):
            for file in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                rel = file.relative_to(self.root).as_posix()
                try:
                    with Image.open(file) as im:
                        im = im.convert(self.mode)
                        if self.size:
                            im = im.resize(self.size, Image.Resampling.BILINEAR)
                        pixels = np.asarray(im, dtype=np.uint8)
                except (OSError, UnidentifiedImageError, ValueError) as e:
                    rejected.append({"id": rel, "reason": "unreadable", "detail": f"Pillow cannot read {rel}: {e}",
                                     "label": folder.name})
                    continue
                images.append(pixels.reshape(*pixels.shape[:2], -1))
                labels.append(label)
                ids.append(rel)
        shapes = collections.Counter(im.shape for im in images)
        if not shapes:
            raise LakeError(f"image folder {self.root} holds no readable images")
        shape = max(shapes, key=lambda s: (shapes[s], -[im.shape for im in images].index(s)))
        keep = [i for i, im in enumerate(images) if im.shape == shape]
        names = [p.name for p in label_dirs]
        for i in (i for i, im in enumerate(images) if im.shape != shape):
            rejected.append({"id": ids[i], "reason": "shape", "label": names[labels[i]],
                             "detail": f"{ids[i]} has shape {list(images[i].shape)}, the others "
                                       f"{list(shape)}; pass a resize size"})
        transforms: list[dict[str, Any]] = [{"name": "decode", "library": "Pillow", "mode": self.mode}]
        if self.size:
            transforms.append({"name": "resize", "size": list(self.size), "resample": "bilinear"})
        return SourceData({"image": np.stack([images[i] for i in keep])}, np.asarray([labels[i] for i in keep]),
                          names, {"image": (0.0, 255.0)}, self.uri, ids=[ids[i] for i in keep],
                          rejected=rejected, transforms=transforms)


class CsvWindowSource:
    """A CSV of sensor readings, one row per time step, cut into fixed-length windows.

    Columns: ``label_column`` (the activity/state at that step), optionally ``series_column`` (windows never cross
    from one series into the next), and numeric ``feature_columns`` (default: all other columns except
    ``time``/``timestamp``). Each window of ``window`` rows, every ``stride`` rows, becomes one example ``signal``
    of shape (window, features) labelled with its rows' label; a window whose rows disagree on the label, or with an
    unparsable cell (read as NaN), goes to the quarantine naming its rows.
    """

    name = "csv"

    def __init__(self, path: str | Path, window: int, stride: int | None = None, label_column: str = "label",
                 series_column: str | None = None, feature_columns: list[str] | None = None):
        if window < 1 or (stride is not None and stride < 1):
            raise LakeError(f"window and stride must be positive, got window={window}, stride={stride}")
        self.path, self.window, self.stride = Path(path), int(window), int(stride or window)
        self.label_column, self.series_column, self.feature_columns = label_column, series_column, feature_columns
        self.uri = f"file://{self.path.resolve()}"

    def load(self) -> SourceData:
        if not self.path.is_file():
            raise LakeError(f"csv source {self.path} does not exist")
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        columns = list(rows[0]) if rows else []
        required = [self.label_column] + ([self.series_column] if self.series_column else [])
        missing = [c for c in required + (self.feature_columns or []) if c not in columns]
        if missing:
            raise LakeError(f"csv source {self.path} lacks column(s) {missing}; it has {columns}")
        features = self.feature_columns or [c for c in columns if c not in required and c not in ("time", "timestamp")]
        if not features:
            raise LakeError(f"csv source {self.path} has no feature columns besides {required}")
        values = np.array([[_to_float(r[c]) for c in features] for r in rows], dtype=np.float32).reshape(-1,
                                                                                                       len(features))
        step_labels = [r[self.label_column] for r in rows]
        series = [r[self.series_column] for r in rows] if self.series_column else [""] * len(rows)
        names = sorted(set(step_labels))
        windows, labels, ids, rejected = [], [], [], []
        start = 0
        while start < len(rows):
            end = start  # rows [start, end) form one series
            while end < len(rows) and series[end] == series[start]:
                end += 1
            for a in range(start, end - self.window + 1, self.stride):
                b = a + self.window
                rid = f"rows {a + 2}-{b + 1}"  # as a spreadsheet numbers them (header is row 1)
                window_labels = sorted(set(step_labels[a:b]))
                if len(window_labels) > 1:
                    rejected.append({"id": rid, "reason": "mixed_labels",
                                     "detail": f"{rid} of {self.path.name} span labels {window_labels}"})
                    continue
                windows.append(values[a:b])
                labels.append(names.index(window_labels[0]))
                ids.append(rid)
            start = end
        if not windows:
            raise LakeError(f"csv source {self.path} yields no windows of {self.window} rows")
        signal = np.stack(windows)
        finite = signal[np.isfinite(signal)]
        value_range = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        transforms = [{"name": "window", "window": self.window, "stride": self.stride, "features": features,
                       "label_column": self.label_column, "series_column": self.series_column,
                       "label_rule": "all rows of a window share the label"}]
        return SourceData({"signal": signal}, np.asarray(labels, dtype=np.int64), names, {"signal": value_range},
                          self.uri, ids=ids, rejected=rejected, transforms=transforms)


def _to_float(cell: str) -> float:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return float("nan")


def make_source(spec: str, **options: Any) -> Source:
    """``digits``, ``sklearn:NAME``, ``npz:PATH``, ``images:DIR`` (option ``size``) or ``csv:PATH`` (options
    ``window``, ``stride``, ``label_column``, ``series_column``), or a plug-in by import path,
    ``package.module:MySource`` (called with the options given; see :mod:`lepton_jax.plugins`), whose ``load()``
    returns a :class:`SourceData`. Options that are ``None`` are ignored."""
    options = {k: v for k, v in options.items() if v is not None}
    kind, _, arg = spec.partition(":")
    allowed = {"digits": set(), "sklearn": set(), "npz": set(), "images": {"size", "mode"},
               "csv": {"window", "stride", "label_column", "series_column"}}
    if kind not in allowed and plugins.is_import_path(spec):
        try:
            source = plugins.load_object(spec, "source")(**options)
        except TypeError as e:
            raise LakeError(f"source {spec!r} rejected its options {options}: {e}") from e
        source.name = spec  # the table's lineage records the import path that made it
        return source
    if kind not in allowed or (kind != "digits" and not arg) or (kind == "digits" and arg):
        raise LakeError(f"unknown source {spec!r}; use 'digits', 'sklearn:NAME', 'npz:PATH', 'images:DIR', "
                        "'csv:PATH' or an import path package.module:Source")
    extra = set(options) - allowed[kind]
    if extra:
        raise LakeError(f"source {kind!r} takes no option(s) {sorted(extra)}")
    if kind == "digits":
        return DigitsSource()
    if kind == "sklearn":
        return SklearnSource(arg)
    if kind == "npz":
        return NpzSource(arg)
    if kind == "images":
        return ImageFolderSource(arg, **options)
    if "window" not in options:
        raise LakeError("a csv source needs a window length (--window N)")
    return CsvWindowSource(arg, **options)
