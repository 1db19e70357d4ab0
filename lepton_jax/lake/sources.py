"""Data sources for the lake. A source loads examples as numpy arrays plus labels; add your own by implementing
:class:`Source` (a ``name``, a ``uri`` and ``load()`` returning :class:`SourceData`).

A source reports examples it cannot even turn into arrays (an unreadable image, an image of another shape) in
``SourceData.rejected`` instead of dropping them, so ingest puts them in the quarantine with their reason; it records
its own preprocessing (decoding, resizing, windowing) with parameters in ``SourceData.transforms`` for the lineage.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lepton_jax.errors import LakeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


DIGEST_OF_ROWS = "row-sha256"  # lineage.source.digest: the source digest is taken over the (sha256) row hashes


def digest_of_rows(row_hash: str) -> str:
    """``lineage.source.digest`` of a source digest taken over row hashes made by ``row_hash``."""
    return DIGEST_OF_ROWS if row_hash == "sha256" else f"row-{row_hash}"

@dataclasses.dataclass
class SourceData:
    """Examples from a source. ``arrays`` share axis 0; ``labels`` are int indices into ``label_names``.

    Optional: ``ids`` names each example (file, rows) for error messages and the quarantine; ``rejected`` lists
    examples the source could not load (``{"id", "reason", "detail"}``); ``transforms`` the source's preprocessing
    steps with their parameters; ``split`` a split name per example when the source assigns splits itself;
    ``column_ranges`` a ``(C, 2)`` array of ``[lo, hi]`` per entry of an array's last axis (tabular features, scaled
    per column; each column range inside the array's ``value_ranges`` entry) and ``column_names`` their names;
    ``targets`` names the arrays that are non-class targets (e.g. a float (N, T) regression target; recorded in the
    schema as ``target_arrays``, with per-split statistics like any array), not model inputs.
    """

    arrays: dict[str, np.ndarray]
    labels: np.ndarray
    label_names: list[str]
    value_ranges: dict[str, tuple[float, float]]
    uri: str
    ids: Sequence[str] | None = None
    rejected: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    transforms: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    split: np.ndarray | None = None
    column_ranges: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    column_names: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    targets: tuple[str, ...] = ()

    def load(self) -> SourceData:
        """Already loaded: a :class:`SourceData` is its own chunk task."""
        return self

    def example_id(self, i: int) -> str:
        return self.ids[i] if self.ids is not None else f"example {i}"

    def digest(self, rows: np.ndarray | None = None, row_hash: str | None = None) -> str:
        """sha256 over every array, the labels and (when present) rejections, transforms and split assignment:
        identical source content gives an identical digest. With ``rows`` (the examples' row hashes,
        :func:`~lepton_jax.lake.fragments.row_hashes`, which ingest computes anyway) the arrays enter as their
        names, dtypes and shapes plus those hashes (made by ``row_hash``, :func:`digest_of_rows`): no second pass
        over their bytes."""
        h = hashlib.sha256()
        if rows is not None:
            if row_hash is None:
                raise LakeError("SourceData.digest over row hashes needs the hash that made them (row_hash=...)")
            h.update(digest_of_rows(row_hash).encode())
        for name in sorted(self.arrays):
            value = np.ascontiguousarray(self.arrays[name])
            h.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
            if rows is None:
                h.update(value.reshape(-1).view(np.uint8))  # the same bytes as tobytes(), without a copy
        if rows is not None:
            h.update(np.ascontiguousarray(rows, dtype=np.uint8))
        h.update(np.ascontiguousarray(self.labels.astype(np.int64)).tobytes())
        h.update("\0".join(self.label_names).encode())
        if self.rejected or self.transforms:
            h.update(json.dumps([self.rejected, self.transforms], sort_keys=True).encode())
        if self.split is not None:
            h.update("\0".join(str(s) for s in self.split).encode())
        if self.column_ranges:  # the same values scaled per column are another table
            h.update(json.dumps({k: np.asarray(v, np.float64).tolist() for k, v in sorted(self.column_ranges.items())}
                                ).encode())
        return h.hexdigest()


class Source(Protocol):
    """A source: ``name``, ``uri`` and ``load()``. A source may also stream: ``tasks()`` returns picklable chunk
    tasks, each with ``load() -> SourceData`` (ingest then runs them one at a time per worker process)."""

    name: str
    uri: str

    def load(self) -> SourceData: ...


_SKLEARN = ("digits", "iris", "wine", "breast_cancer", "diabetes", "digits_attributes", "digits_strokes")


class SklearnSource:
    """One of scikit-learn's bundled datasets (``digits``, ``iris``, ``wine``, ``breast_cancer``, ``diabetes``); no
    download.

    ``digits`` gives ``image`` (N, 8, 8, 1) uint8 in 0..16; the others give ``features`` (N, F) float32 with each
    column's min/max as its range (``column_ranges``) and scikit-learn's feature names. ``diabetes`` is a regression
    set: its continuous target is the float32 target array ``target`` (N, 1) (``targets``), and its class labels
    are the target's quartile (``q1`` .. ``q4``), so splits are stratified by the target's range.
    """

    def __init__(self, dataset: str = "digits"):
        if dataset not in _SKLEARN:
            raise LakeError(f"unknown scikit-learn dataset {dataset!r}; choose one of {', '.join(_SKLEARN)}")
        self.dataset = dataset
        self.name = "digits" if dataset == "digits" else f"sklearn:{dataset}"
        self.uri = f"sklearn://datasets/load_{dataset}"

    def load(self) -> SourceData:
        import sklearn.datasets

        if self.dataset == "digits_attributes":
            return self._attributes(sklearn.datasets.load_digits())
        if self.dataset == "digits_strokes":
            return self._strokes(sklearn.datasets.load_digits())
        bunch = getattr(sklearn.datasets, f"load_{self.dataset}")()
        if self.dataset == "diabetes":
            return self._regression(bunch)
        names = [str(n) for n in bunch.target_names]
        labels = bunch.target.astype(np.int64)
        if self.dataset == "digits":
            images = bunch.images
            if not np.array_equal(images, np.round(images)):
                raise LakeError("sklearn digits are expected to hold integer pixel values 0..16")
            return SourceData({"image": images.astype(np.uint8)[..., None]}, labels, names,
                              {"image": (0.0, 16.0)}, self.uri)
        features = bunch.data.astype(np.float32)
        columns = np.stack([features.min(axis=0), features.max(axis=0)], axis=1).astype(np.float64)
        return SourceData({"features": features}, labels, names,
                          {"features": (float(features.min()), float(features.max()))}, self.uri,
                          column_ranges={"features": columns},
                          column_names={"features": [str(n) for n in bunch.feature_names]})

    def _attributes(self, bunch: Any) -> SourceData:
        """The digits images with a multi-hot target of three attributes of the digit (even, at least 5, prime):
        a small, deterministic multi-label table; class labels stay the digits (splits stratified by digit)."""
        digit = bunch.target.astype(np.int64)
        target = np.stack([digit % 2 == 0, digit >= 5, np.isin(digit, (2, 3, 5, 7))], axis=1).astype(np.float32)
        return SourceData({"image": bunch.images.astype(np.uint8)[..., None], "target": target}, digit,
                          [str(n) for n in bunch.target_names], {"image": (0.0, 16.0), "target": (0.0, 1.0)},
                          self.uri,
                          column_ranges={"target": np.asarray([[0.0, 1.0]] * 3)},
                          column_names={"target": ["even", "at_least_5", "prime"]}, targets=("target",))

    def _strokes(self, bunch: Any) -> SourceData:
        """The digits images with a per-pixel target: stroke (1) where the pixel value is at least 8 of 16, else
        background (0); a small, deterministic dense-target (segmentation) table stratified by digit."""
        images = bunch.images.astype(np.uint8)
        return SourceData({"image": images[..., None], "target": (images >= 8).astype(np.uint8)},
                          bunch.target.astype(np.int64), [str(n) for n in bunch.target_names],
                          {"image": (0.0, 16.0), "target": (0.0, 1.0)}, self.uri, targets=("target",))

    def _regression(self, bunch: Any) -> SourceData:
        features = bunch.data.astype(np.float32)
        target = bunch.target.astype(np.float32).reshape(-1, 1)
        labels = np.searchsorted(np.quantile(target[:, 0], [0.25, 0.5, 0.75]), target[:, 0], side="right")
        columns = {"features": np.stack([features.min(axis=0), features.max(axis=0)], axis=1).astype(np.float64),
                   "target": np.stack([target.min(axis=0), target.max(axis=0)], axis=1).astype(np.float64)}
        return SourceData({"features": features, "target": target}, labels.astype(np.int64),
                          ["q1", "q2", "q3", "q4"],
                          {"features": (float(features.min()), float(features.max())),
                           "target": (float(target.min()), float(target.max()))}, self.uri,
                          column_ranges=columns,
                          column_names={"features": [str(n) for n in bunch.feature_names], "target": ["target"]},
                          targets=("target",))


class DigitsSource(SklearnSource):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, values 0..16); ships with the package."""

    def __init__(self):
        super().__init__("digits")


def storable_dtype(dtype: np.dtype) -> bool:
    """Whether arrays of ``dtype`` can be stored: booleans, integers and floats of up to 64 bits (no complex,
    strings, objects, dates or extended-precision floats: they would be cast with a loss, or not at all)."""
    dtype = np.dtype(dtype)
    return dtype.kind in "biu" or (dtype.kind == "f" and dtype.itemsize <= 8)


def check_source(source: Any) -> Source:
    """``source`` ready for an ingest: it must have ``load()`` or ``tasks()``; a ``name`` and ``uri`` it lacks
    (optional for a user's source) default to its class's name and ``python:module:Class``. One clear error else."""
    kind = type(source)
    if not callable(getattr(source, "load", None)) and not callable(getattr(source, "tasks", None)):
        raise LakeError(f"source {kind.__module__}:{kind.__qualname__} has neither load() nor tasks(); a source's "
                        "load() returns lepton_jax.lake.sources.SourceData (or tasks() returns objects that do)")
    defaults = {"name": kind.__qualname__, "uri": f"python:{kind.__module__}:{kind.__qualname__}"}
    for attr, default in defaults.items():
        value = getattr(source, attr, None)
        if value is None:
            try:
                setattr(source, attr, default)
            except AttributeError as e:
                raise LakeError(f"source {kind.__module__}:{kind.__qualname__} has no {attr!r} attribute and "
                                f"takes none; give it one (a string)") from e
        elif not isinstance(value, str):
            raise LakeError(f"source {kind.__module__}:{kind.__qualname__}: {attr} must be a string, got "
                            f"{type(value).__name__}")
    return source


def source_tasks(source: Source, map_fn: Callable[..., Iterable[Any]] | None = None) -> list[Any]:
    """The chunks ``source`` streams as: its ``tasks()`` (picklable objects with ``load() -> SourceData``, one
    chunk each, in order) or, for a source without ``tasks``, the source itself (one chunk). ``map_fn`` (like
    ``map``; e.g. a process pool's) runs the scan a source may need first (an image folder's headers) in parallel."""
    tasks = getattr(source, "tasks", None)
    if tasks is None:
        return [source]
    if map_fn is not None and isinstance(source, ImageFolderSource):
        return list(source.tasks(map_fn))
    return list(tasks())


def concat(parts: list[SourceData]) -> SourceData:
    """The chunks of a source as one :class:`SourceData` (for ``load()`` of a chunked source; in memory)."""
    first = parts[0]
    names = max((p.label_names for p in parts), key=len)
    ids = None
    if any(p.ids is not None for p in parts):
        ids = [i for k, p in enumerate(parts) for i in (p.ids if p.ids is not None else
                                                         [f"chunk {k} example {j}" for j in range(len(p.labels))])]
    ranges = {k: (min(p.value_ranges[k][0] for p in parts), max(p.value_ranges[k][1] for p in parts))
              for k in first.value_ranges}
    columns = {k: np.stack([np.minimum.reduce([p.column_ranges[k][:, 0] for p in parts]),
                            np.maximum.reduce([p.column_ranges[k][:, 1] for p in parts])], axis=1)
               for k in first.column_ranges}
    kept = [p for p in parts if p.labels.shape[0]]
    if not kept:
        raise LakeError(f"source {first.uri} holds no readable examples")
    return SourceData({k: np.concatenate([p.arrays[k] for p in kept]) for k in kept[0].arrays},
                      np.concatenate([p.labels for p in kept]), names, ranges, first.uri, ids=ids,
                      rejected=[r for p in parts for r in p.rejected], transforms=first.transforms,
                      split=None if first.split is None else np.concatenate([p.split for p in kept]),
                      column_ranges=columns, column_names=first.column_names, targets=first.targets)


def _read_npz(path: Path, feature_key: str, label_key: str, split_key: str | None, target_key: str | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    keys = {feature_key, label_key} | ({split_key} if split_key else set()) | ({target_key} if target_key else set())
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise LakeError(f"npz source {path} is a single .npy array, not an .npz archive of named arrays")
            missing = keys - set(data.files)
            if missing:
                raise LakeError(f"npz source {path} lacks {sorted(missing)}; it has {data.files}")
            features, labels = data[feature_key], data[label_key]
            split = data[split_key].astype(str) if split_key else None
            target = data[target_key] if target_key else None
    except LakeError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise LakeError(f"cannot read npz source {path} (not a valid .npz archive, or ragged or object arrays, "
                        f"which are not supported; every example must have one shape): {e}") from e
    if not storable_dtype(features.dtype):
        raise LakeError(f"npz source {path}: features {feature_key!r} have dtype {features.dtype}; lake arrays hold "
                        "booleans, integers and floats of up to 64 bits (convert strings, complex numbers and dates "
                        "first)")
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise LakeError(f"npz source {path}: labels {label_key!r} must be a 1-D integer array, "
                        f"got {labels.dtype} with shape {labels.shape}")
    if features.ndim < 2:
        raise LakeError(f"npz source {path}: features {feature_key!r} must have an example axis and "
                        f"at least one more, got shape {features.shape}")
    if features.shape[0] != labels.shape[0]:
        raise LakeError(f"npz source {path}: {features.shape[0]} examples in {feature_key!r} but "
                        f"{labels.shape[0]} labels in {label_key!r}")
    if target is not None:
        if not storable_dtype(target.dtype) or target.ndim < 1 or target.shape[0] != labels.shape[0]:
            raise LakeError(f"npz source {path}: target {target_key!r} must be a numeric array with one row per "
                            f"example ({labels.shape[0]}), got {target.dtype} with shape {target.shape}")
        if target.ndim == 1:  # one value per example: a (N, 1) target vector
            target = target[:, None]
    return features, labels, split, target


@dataclasses.dataclass(frozen=True)
class RowIds(Sequence[str]):
    """The ids ``<name>[i]`` of a file's ``n`` rows, made on demand (a list of a million strings costs a second)."""

    name: str
    n: int

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # noqa: ANN001 - an int or a slice, as for a list
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.n))]
        i = int(i)
        if not -self.n <= i < self.n:
            raise IndexError(f"row {i} of {self.n}")
        return f"{self.name}[{i % self.n}]"


class NpzSource:
    """A ``.npz`` file, or a directory of ``.npz`` shards (read one shard per chunk, in name order), each with a
    feature array (key ``feature_key``) and an integer label array (``label_key``), optionally a split name per
    example (``split_key``) and a target array (``target_key``): a float vector (N, T) or (N,) for regression, a
    multi-hot (N, K) for multi-label, or a class map shaped like the input (N, H, W) for dense targets. The target is
    stored as ``target`` (a 1-D one as (N, 1)), with its range (per column for a 2-D one) and statistics; the schema
    names it in ``target_arrays``."""

    name = "npz"

    def __init__(self, path: str | Path, feature_key: str = "x", label_key: str = "y",
                 label_names: list[str] | None = None, value_range: tuple[float, float] | None = None,
                 split_key: str | None = None, per_column: bool = False, target_key: str | None = None):
        self.path = Path(path)
        self.uri = f"file://{self.path.resolve()}"
        self.feature_key, self.label_key, self.split_key = feature_key, label_key, split_key
        self.target_key = target_key
        self.label_names, self.value_range = label_names, value_range
        self.per_column = per_column  # 2-D (N, F) tabular features: one range per column (the data's min/max)

    def tasks(self) -> list[NpzShard]:
        if self.path.is_dir():
            files = sorted(self.path.glob("*.npz"))
            if not files:
                raise LakeError(f"npz source {self.path} is a directory without .npz files")
        elif self.path.is_file():
            files = [self.path]
        else:
            raise LakeError(f"npz source {self.path} does not exist")
        sharded = self.path.is_dir()
        return [NpzShard(f, self.uri, self.feature_key, self.label_key, self.label_names, self.value_range,
                         self.split_key, sharded, self.per_column, self.target_key) for f in files]

    def load(self) -> SourceData:
        return concat([t.load() for t in self.tasks()])


@dataclasses.dataclass
class NpzShard:
    """One ``.npz`` file of an :class:`NpzSource` (one chunk)."""

    path: Path
    uri: str
    feature_key: str
    label_key: str
    label_names: list[str] | None
    value_range: tuple[float, float] | None
    split_key: str | None
    sharded: bool
    per_column: bool = False
    target_key: str | None = None

    def load(self) -> SourceData:
        features, labels, split, target = _read_npz(self.path, self.feature_key, self.label_key, self.split_key,
                                                    self.target_key)
        names = self.label_names or [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]
        finite = features[np.isfinite(features)] if np.issubdtype(features.dtype, np.floating) else features
        value_range = self.value_range or ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0))
        ids = RowIds(self.path.name, int(labels.shape[0])) if self.sharded else None
        columns = {}
        if self.per_column:
            if features.ndim != 2:
                raise LakeError(f"npz source {self.path}: per-column ranges need 2-D (examples, columns) features, "
                                f"got shape {features.shape}")
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: its range becomes (lo, lo)
                f64 = features.astype(np.float64)
                f64[~np.isfinite(f64)] = np.nan
                col = np.stack([np.nanmin(f64, axis=0), np.nanmax(f64, axis=0)], axis=1) if features.shape[0] \
                    else np.zeros((features.shape[1], 2))
            col = np.nan_to_num(col, nan=float(value_range[0]))
            columns = {"image": np.clip(col, float(value_range[0]), float(value_range[1]))}
        arrays, ranges, targets = {"image": features}, {"image": value_range}, ()
        if target is not None:
            arrays["target"], ranges["target"], targets = target, _finite_range(target), ("target",)
            if target.ndim == 2:  # a target vector: one range per column (names: target_0 ...)
                columns["target"] = np.asarray([_finite_range(c) for c in target.T], np.float64).reshape(-1, 2)
        return SourceData(arrays, labels.astype(np.int64), names, ranges, self.uri,
                          ids=ids, split=split, column_ranges=columns, targets=targets)


def _finite_range(values: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of the finite values (``(0, 0)`` when there are none; non-finite rows are quarantined)."""
    finite = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageFolderSource:
    """A folder of images with one subfolder per label: ``ROOT/<label>/<file>`` (JPEG, PNG, any format Pillow
    reads), streamed in chunks of ``chunk_files`` files.

    Images are converted to ``mode`` (``L``: grey, one channel; ``RGB``: three) and, with ``size=(width, height)``,
    resized (bilinear). ``bits=8`` stores uint8 and quarantines images with more than 8 bits per channel (reason
    ``bit_depth``: never silently clipped); ``bits=16`` stores uint16 (8-bit images scaled by 257, exactly). Without
    ``size`` every image must have the shape most of them have (found by reading headers first); the others, files
    that are not images (``not_an_image``) and images Pillow cannot read (``unreadable``) go to the quarantine with
    their file named.
    """

    name = "images"

    def __init__(self, root: str | Path, size: tuple[int, int] | None = None, mode: str = "L", bits: int = 8,
                 chunk_files: int = 2048):
        if mode not in ("L", "RGB"):
            raise LakeError(f"image mode must be 'L' or 'RGB', got {mode!r}")
        if bits not in (8, 16):
            raise LakeError(f"image bits must be 8 or 16, got {bits!r}")
        self.root, self.size, self.mode = Path(root), (tuple(int(s) for s in size) if size else None), mode
        self.bits, self.chunk_files = int(bits), max(1, int(chunk_files))
        self.uri = f"file://{self.root.resolve()}"

    def _files(self) -> tuple[list[str], list[tuple[str, int]]]:
        if not self.root.is_dir():
            raise LakeError(f"image folder {self.root} does not exist")
        label_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not label_dirs:
            raise LakeError(f"image folder {self.root} has no label subfolders (expected ROOT/<label>/<image>)")
        files = []
        for k, d in enumerate(label_dirs):  # scandir: file types from the directory listing, no stat per file
            with os.scandir(d) as entries:
                names = sorted(e.name for e in entries if e.is_file() and not e.name.startswith("."))
            files += [(f"{d.name}/{name}", k) for name in names]
        return [d.name for d in label_dirs], files

    def _majority_shape(self, files: list[tuple[str, int]], map_fn: Callable[..., Iterable[Any]] = map
                        ) -> tuple[int, ...] | None:
        counts: collections.Counter = collections.Counter()
        parts = [(self.root, [rel for rel, _ in files[i:i + self.chunk_files]])
                 for i in range(0, len(files), self.chunk_files)]
        for part in map_fn(image_sizes, parts):  # in order: ties go to the first shape seen, as in one pass
            counts.update(part)
        if not counts:
            return None
        (h, w), _ = max(counts.items(), key=lambda kv: kv[1])  # ties: the first seen (Counter keeps insertion order)
        return (h, w, 3 if self.mode == "RGB" else 1)

    def tasks(self, map_fn: Callable[..., Iterable[Any]] = map) -> list[ImageChunk]:
        """The chunks; without a resize size, after reading every header for the majority shape (with ``map_fn``)."""
        names, files = self._files()
        if not files:
            raise LakeError(f"image folder {self.root} holds no files")
        shape = None if self.size else self._majority_shape(files, map_fn)
        if not self.size and shape is None:
            raise LakeError(f"image folder {self.root} holds no readable images")
        return [ImageChunk(self.root, self.uri, files[i:i + self.chunk_files], names, self.size, self.mode,
                           self.bits, shape) for i in range(0, len(files), self.chunk_files)]

    def load(self) -> SourceData:
        return concat([t.load() for t in self.tasks()])


def image_sizes(part: tuple[Path, list[str]]) -> collections.Counter:
    """``(height, width)`` counts of the images ``part[1]`` (paths relative to ``part[0]``), in first-seen order;
    files Pillow cannot open are skipped (they are quarantined when their chunk is decoded)."""
    from PIL import Image

    root, files = part
    counts: collections.Counter = collections.Counter()
    for rel in files:
        try:
            with Image.open(root / rel) as im:
                counts[(im.size[1], im.size[0])] += 1
        except Exception:  # noqa: BLE001 - unreadable files are quarantined when the chunk is decoded
            continue
    return counts


@dataclasses.dataclass
class ImageChunk:
    """Some files of an :class:`ImageFolderSource` (one chunk)."""

    root: Path
    uri: str
    files: list[tuple[str, int]]
    names: list[str]
    size: tuple[int, int] | None
    mode: str
    bits: int
    shape: tuple[int, ...] | None

    def load(self) -> SourceData:
        dtype = np.uint16 if self.bits == 16 else np.uint8
        images, labels, ids, rejected = [], [], [], []
        for rel, label in self.files:
            pixels, why = self._decode(rel)
            if why is not None:
                rejected.append({"id": rel, "label": self.names[label], **why})
                continue
            if self.shape is not None and pixels.shape != tuple(self.shape):
                rejected.append({"id": rel, "reason": "shape", "label": self.names[label],
                                 "detail": f"{rel} has shape {list(pixels.shape)}, the others "
                                           f"{list(self.shape)}; pass a resize size"})
                continue
            images.append(pixels)
            labels.append(label)
            ids.append(rel)
        channels = 3 if self.mode == "RGB" else 1
        shape = tuple(self.shape) if self.shape else (self.size[1], self.size[0], channels)
        transforms: list[dict[str, Any]] = [{"name": "decode", "library": "Pillow", "mode": self.mode,
                                             "bits": self.bits}]
        if self.size:
            transforms.append({"name": "resize", "size": list(self.size), "resample": "bilinear"})
        stacked = np.stack(images) if images else np.zeros((0, *shape), dtype)
        top = 65535.0 if self.bits == 16 else 255.0
        return SourceData({"image": stacked}, np.asarray(labels, dtype=np.int64), list(self.names),
                          {"image": (0.0, top)}, self.uri, ids=ids, rejected=rejected, transforms=transforms)

    def _decode(self, rel: str) -> tuple[np.ndarray | None, dict[str, str] | None]:
        from PIL import Image, UnidentifiedImageError

        path = self.root / rel
        try:
            with Image.open(path) as im:
                # Pillow reads 16-bit colour PNGs as 8 bits per channel without saying so: only those modes need
                # the header's bit depth, read from the file Pillow holds open
                deep = im.mode in _HIGH_DEPTH_MODES or (im.format == "PNG" and im.mode in ("RGB", "RGBA", "LA")
                                                        and _png_bit_depth(im.fp) == 16)
                if deep and self.bits == 8:
                    return None, {"reason": "bit_depth",
                                  "detail": f"{rel} has more than 8 bits per channel (mode {im.mode}); pass "
                                            "--bits 16 to keep it as uint16 (it is never clipped to 8 bits)"}
                if deep and im.mode not in _HIGH_DEPTH_MODES:
                    return None, {"reason": "bit_depth",
                                  "detail": f"{rel} is a 16-bit colour image, which Pillow reads only as 8 bits "
                                            "per channel; convert it to 16-bit grey or 8-bit colour"}
                if deep:
                    im = im.convert("I")
                    if self.size:
                        im = im.resize(self.size, Image.Resampling.BILINEAR)
                    values = np.asarray(im)
                    if values.min() < 0 or values.max() > 65535:
                        return None, {"reason": "bit_depth",
                                      "detail": f"{rel} has values outside 0..65535 (mode {im.mode})"}
                    pixels = values.astype(np.uint16)[..., None]
                    if self.mode == "RGB":
                        pixels = np.repeat(pixels, 3, axis=-1)
                    return pixels, None
                im = im.convert(self.mode)
                if self.size:
                    im = im.resize(self.size, Image.Resampling.BILINEAR)
                pixels = np.asarray(im, dtype=np.uint8)
        except UnidentifiedImageError as e:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                return None, {"reason": "unreadable", "detail": f"Pillow cannot read {rel}: {e}"}
            return None, {"reason": "not_an_image", "detail": f"{rel} is not an image Pillow recognises: {e}"}
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            return None, {"reason": "unreadable", "detail": f"Pillow cannot read {rel}: {e}"}
        pixels = pixels.reshape(*pixels.shape[:2], -1)
        if self.bits == 16:
            pixels = pixels.astype(np.uint16) * 257
        return pixels, None


def _png_bit_depth(fp: Any) -> int | None:
    """The bit depth in the header of the PNG open as ``fp`` (read without moving its position)."""
    head = os.pread(fp.fileno(), 25, 0)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
    return None
