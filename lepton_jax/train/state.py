"""The explicit training state and model splitting.

Parameters live as plain nested dicts (``nnx.split`` then ``to_pure_dict``), so Optax, Orbax and sharding all see
an ordinary pytree; ``nnx.merge(graphdef, params)`` rebuilds the module inside jitted functions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 PRNG key; per-step keys are fold_in(rng, step)


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
    """The module's static structure and its parameters as a plain dict."""
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def create_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed))


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
