"""A multilayer perceptron for tabular feature vectors (scikit-learn's iris, wine, breast_cancer tables)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_jax.models.layers import dense_inits


class MLP(nnx.Module):
    """Dense-relu-dropout layers and a linear classifier over inputs ``(batch, *example_shape)``, flattened.

    Inputs are scaled to [0, 1]. Dropout takes its key per call (``rngs=``), as in every lepton_jax model.
    """

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (64, 64),
                 dropout: float = 0.1, dtype: str = "float32", rngs: nnx.Rngs):
        self.dtype = jnp.dtype(dtype)
        width = 1
        for d in input_shape:
            width *= int(d)
        self.layers = nnx.List()
        in_name = None  # the input features are never sharded
        for h in hidden:
            self.layers.append(nnx.Linear(width, h, dtype=self.dtype, rngs=rngs, **dense_inits(in_name, "mlp")))
            width, in_name = h, "mlp"
        self.dropout = nnx.Dropout(dropout)
        self.head = nnx.Linear(width, num_classes, dtype=self.dtype, rngs=rngs, **dense_inits(in_name, "classes"))

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype).reshape(x.shape[0], -1)
        keys = jax.random.split(rngs, len(self.layers)) if rngs is not None else [None] * len(self.layers)
        for layer, key in zip(self.layers, keys, strict=True):
            x = self.dropout(nnx.relu(layer(x)), deterministic=not train, rngs=key)
        return self.head(x).astype(jnp.float32)
