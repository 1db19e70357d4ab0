"""Grain input pipelines over pinned lake table versions, assembled into global jax.Arrays.

The names below load on first use: ``lepton_jax.data.transforms`` is numpy-only and the server's codec process
imports it, which must not pull in grain, tensorstore and jax (seconds of start-up, and a process that signals
cannot stop promptly)."""

from importlib import import_module
from typing import Any

_HOME = {"ShuffledBatches": "pipeline", "eval_batches": "pipeline", "host_slice": "pipeline", "to_global": "pipeline",
         "train_dataset": "pipeline", "LakeDataSource": "source", "prepare_batch": "transforms",
         "scale_to_unit": "transforms"}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
