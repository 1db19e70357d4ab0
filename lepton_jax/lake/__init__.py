"""The data lake: versioned tables of immutable fragments (TensorStore zarr v3 arrays) with atomic commits,
append-only versions and compaction, streaming validated ingest from several sources, verification and garbage
collection."""

from lepton_jax.lake.csvsource import CsvWindowSource
from lepton_jax.lake.ingest import IngestResult, ingest
from lepton_jax.lake.source_spec import make_source
from lepton_jax.lake.sources import (
    DigitsSource,
    ImageFolderSource,
    NpzSource,
    SklearnSource,
    Source,
    SourceData,
)
from lepton_jax.lake.store import GcReport, Lake, Problem, SplitReader, TableVersion

__all__ = [
    "CsvWindowSource",
    "DigitsSource",
    "GcReport",
    "ImageFolderSource",
    "IngestResult",
    "Lake",
    "NpzSource",
    "Problem",
    "SklearnSource",
    "Source",
    "SourceData",
    "SplitReader",
    "TableVersion",
    "ingest",
    "make_source",
]
