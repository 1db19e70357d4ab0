"""Sources named on the command line: ``digits``, ``sklearn:NAME``, ``npz:PATH``, ``images:DIR``, ``csv:PATH`` or a
plug-in's import path -> a :class:`~lepton_jax.lake.sources.Source`."""

from __future__ import annotations

from typing import Any

from lepton_jax import plugins
from lepton_jax.errors import LakeError
from lepton_jax.lake.csvsource import CsvWindowSource
from lepton_jax.lake.sources import DigitsSource, ImageFolderSource, NpzSource, SklearnSource, Source


def make_source(spec: str, **options: Any) -> Source:
    """``digits``, ``sklearn:NAME``, ``npz:PATH`` (a file or a directory of shards; options ``per_column``,
    ``feature_key``, ``label_key``, ``target_key``), ``images:DIR`` (options ``size``, ``mode``, ``bits``) or
    ``csv:PATH`` (options ``window``, ``stride``, ``label_column``, ``series_column``, ``target_columns``,
    ``target_reduce``), or a plug-in by import path, ``package.module:MySource`` (called with the
    options given; see :mod:`lepton_jax.plugins`). Options that are ``None`` are ignored."""
    options = {k: v for k, v in options.items() if v is not None}
    kind, _, arg = spec.partition(":")
    allowed = {"digits": set(), "sklearn": set(), "npz": {"per_column", "feature_key", "label_key", "target_key"},
               "images": {"size", "mode", "bits", "chunk_files"},
               "csv": {"window", "stride", "label_column", "series_column", "chunk_windows", "target_columns",
                       "target_reduce"}}
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
        return NpzSource(arg, **options)
    if kind == "images":
        return ImageFolderSource(arg, **options)
    if "window" not in options:
        raise LakeError("a csv source needs a window length (--window N)")
    return CsvWindowSource(arg, **options)
