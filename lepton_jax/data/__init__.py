"""Grain input pipelines over pinned lake table versions, assembled into global jax.Arrays."""

from lepton_jax.data.pipeline import ShuffledBatches, eval_batches, host_slice, to_global, train_dataset
from lepton_jax.data.source import LakeDataSource
from lepton_jax.data.transforms import prepare_batch, scale_to_unit

__all__ = ["LakeDataSource", "ShuffledBatches", "eval_batches", "host_slice", "prepare_batch", "scale_to_unit",
           "to_global", "train_dataset"]
