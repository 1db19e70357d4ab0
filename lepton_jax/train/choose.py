"""Which training strategy a config asks for (:mod:`lepton_jax.train.strategy`, :mod:`lepton_jax.train.edge`).

The factory lives above both strategies so that their imports run one way (edge -> strategy, never back)."""

from __future__ import annotations

from typing import Any

import ml_collections

from lepton_jax.data import LakeDataSource
from lepton_jax.errors import ConfigError
from lepton_jax.train.edge import EdgeStrategy
from lepton_jax.train.strategy import Strategy, SyncStrategy


def make_strategy(config: ml_collections.ConfigDict, schema: dict[str, Any], train_source: LakeDataSource,
                  devices: list | None = None) -> Strategy:
    """The strategy ``config`` asks for: edge training when ``edge.nodes > 1``, else synchronous."""
    if config.edge.nodes > 1:
        if config.task.name != "classification":  # the edge step (train/edge.py) trains on cross-entropy
            raise ConfigError(f"edge training (edge.nodes={config.edge.nodes}) trains classifiers only; task "
                              f"{config.task.name!r} needs edge.nodes=1")
        return EdgeStrategy(config, schema, train_source, devices)
    return SyncStrategy(config, schema, len(train_source), devices)
