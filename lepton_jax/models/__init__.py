"""Flax NNX models, built by name from the config's ``model`` section."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
from flax import nnx

from lepton_jax.errors import ConfigError
from lepton_jax.models.cnn import CNN
from lepton_jax.models.mlp import MLP
from lepton_jax.models.resnet import ResNet
from lepton_jax.models.tcn import TemporalCNN
from lepton_jax.models.vit import ViT

MODELS: dict[str, Callable[..., nnx.Module]] = {"cnn": CNN, "mlp": MLP, "resnet": ResNet, "tcn": TemporalCNN,
                                                "vit": ViT}


def build_model(config: ml_collections.ConfigDict, *, input_shape: tuple[int, ...], num_classes: int,
                seed: int) -> nnx.Module:
    """Builds ``config.name`` with the remaining ``config`` fields as keyword arguments."""
    kwargs = {k: v for k, v in config.to_dict().items() if k != "name"}
    if config.name not in MODELS:
        raise ConfigError(f"unknown model {config.name!r}; known models: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[config.name](input_shape=tuple(input_shape), num_classes=num_classes, rngs=nnx.Rngs(seed),
                                   **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {config.name!r} rejected its config {kwargs}: {e}") from e
