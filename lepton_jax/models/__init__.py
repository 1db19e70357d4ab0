"""Flax NNX models, built from the config's ``model`` section by name or by import path.

``model.name`` is a built-in name (``cnn``, ``mlp``, ``resnet``, ``tcn``, ``vit``), a name added in this process with
:func:`register_model`, or an import path ``package.module:Class`` (see :mod:`lepton_jax.plugins`). A model is any
``nnx.Module`` whose constructor takes ``input_shape``, ``num_classes``, ``rngs`` and the ``model`` keys it declares
as keyword arguments (the base config's ``model`` keys it does not declare are left out, so a plug-in needs no
``**unused``) and whose ``__call__(x, train=...)`` returns logits; give it logical axis names (see
:mod:`lepton_jax.models.layers`) to shard it beyond data parallelism.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import ml_collections
from flax import nnx

from lepton_jax import plugins
from lepton_jax.config import base_config
from lepton_jax.errors import ConfigError
from lepton_jax.models.cnn import CNN
from lepton_jax.models.fcn import FCN
from lepton_jax.models.mlp import MLP
from lepton_jax.models.resnet import ResNet
from lepton_jax.models.tcn import TemporalCNN
from lepton_jax.models.vit import ViT

MODELS: dict[str, Callable[..., nnx.Module]] = {"cnn": CNN, "fcn": FCN, "mlp": MLP, "resnet": ResNet,
                                                "tcn": TemporalCNN, "vit": ViT}


def build_model(config: ml_collections.ConfigDict, *, input_shape: tuple[int, ...], num_classes: int,
                seed: int) -> nnx.Module:
    """Builds ``config.name`` with the remaining ``config`` fields as keyword arguments, less the base config's
    ``model`` keys its constructor does not declare (:func:`lepton_jax.plugins.declared_kwargs`)."""
    factory = model_factory(config.name)
    kwargs = plugins.declared_kwargs(factory, {k: v for k, v in config.to_dict().items() if k != "name"},
                                     inherited=_base_model_keys())
    try:
        return factory(input_shape=tuple(input_shape), num_classes=num_classes, rngs=nnx.Rngs(seed),
                                   **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {config.name!r} rejected its config {kwargs}: {e}") from e


@functools.cache
def _base_model_keys() -> frozenset[str]:
    """The ``model`` keys of the base config (the built-in CNN's), which every config starting from it inherits."""
    return frozenset(base_config().model.keys()) - {"name"}


def register_model(name: str, factory: Callable[..., nnx.Module]) -> None:
    """Makes ``model.name=name`` build ``factory`` in this process (a notebook, a script). Commands that run in
    another process (``lepton-jax eval``, ``serve`` ...) rebuild models from the saved config, so for those use an
    import path (``model.name="my_pkg.models:Tiny"``) instead."""
    if plugins.is_import_path(name) or not name.isidentifier():
        raise ConfigError(f"register_model: {name!r} must be a plain identifier (import paths need no registration)")
    MODELS[name] = factory


def model_factory(name: str) -> Callable[..., nnx.Module]:
    """The class or function ``model.name`` names (built-in, registered, or ``package.module:Class``)."""
    if name in MODELS:
        return MODELS[name]
    if plugins.is_import_path(name):
        return plugins.load_object(name, "model")
    raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}, or an import path "
                      "package.module:Class")
