"""A small convolutional classifier for low-resolution images (the embedded digits default)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_jax.models.layers import conv_inits, dense_inits


class CNN(nnx.Module):
    """conv-relu blocks, 2x2 average pooling, a hidden dense layer with dropout, and a linear classifier.

    Inputs are images ``(batch, height, width, channels)`` scaled to [0, 1]. Dropout takes its key per call
    (``rngs=``), so the module holds parameters only and the train step stays a pure function.
    """

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, features: Sequence[int] = (32, 64),
                 hidden: int = 128, dropout: float = 0.25, dtype: str = "float32", rngs: nnx.Rngs):
        height, width, channels = input_shape
        self.dtype = jnp.dtype(dtype)  # compute dtype; parameters stay float32 (mixed precision)
        self.convs = nnx.List()  # nnx.List keeps the layers as graph nodes
        for feats in features:
            in_name = None if channels == input_shape[-1] else "conv_in"
            self.convs.append(nnx.Conv(channels, feats, kernel_size=(3, 3), dtype=self.dtype, rngs=rngs,
                                       **conv_inits(in_name)))
            channels = feats
        flat = (height // 2) * (width // 2) * channels
        self.hidden = nnx.Linear(flat, hidden, dtype=self.dtype, rngs=rngs, **dense_inits("embed", "mlp"))
        self.dropout = nnx.Dropout(dropout)
        self.head = nnx.Linear(hidden, num_classes, dtype=self.dtype, rngs=rngs, **dense_inits("mlp", "classes"))

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        for conv in self.convs:
            x = nnx.relu(conv(x))
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.hidden(x))
        x = self.dropout(x, deterministic=not train, rngs=rngs)
        return self.head(x).astype(jnp.float32)
