"""The data lake: versioned tables of TensorStore zarr v3 arrays with atomic commits."""

from lepton_jax.lake.ingest import IngestResult, ingest
from lepton_jax.lake.sources import DigitsSource, NpzSource, Source, SourceData, make_source
from lepton_jax.lake.store import Lake, SplitReader, TableVersion

__all__ = [
    "DigitsSource",
    "IngestResult",
    "Lake",
    "NpzSource",
    "Source",
    "SourceData",
    "SplitReader",
    "TableVersion",
    "ingest",
    "make_source",
]
