"""The model as a pure function of its parameters: split a module, apply it, predict, and the classifier loss.

``robust/`` and ``serve/`` use these without importing ``train/``. Parameters are plain nested dicts
(``nnx.split`` then ``to_pure_dict``), so Optax, Orbax and sharding all see an ordinary pytree;
``nnx.merge(graphdef, params)`` rebuilds the module inside jitted functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
    """The module's static structure and its parameters as a plain dict."""
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def make_apply(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
    """``apply(params, x, train=False, rngs=None) -> logits``: the model as a pure function of its params."""

    def apply(params, x, *, train: bool = False, rngs: jax.Array | None = None) -> jax.Array:
        return nnx.merge(graphdef, params)(x, train=train, rngs=rngs)

    return apply


def make_predict(graphdef: nnx.GraphDef) -> Callable[[Any, jax.Array], jax.Array]:
    """``predict(params, x) -> logits`` in inference mode (no dropout)."""
    apply = make_apply(graphdef)
    return lambda params, x: apply(params, x, train=False)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
