"""The explicit training state of synchronous training."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lepton_jax.models.functional import count_params, split_model

__all__ = ["TrainState", "count_params", "create_state", "split_model"]


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 PRNG key; per-step keys are fold_in(rng, step)


def create_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed))
