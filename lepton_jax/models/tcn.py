"""A temporal convolutional classifier for windows of sensor readings (tables ingested from CSV logs)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_jax.models.layers import conv_inits, dense_inits


class TemporalCNN(nnx.Module):
    """1-D conv-relu blocks over time (each halving the length by max pooling), global average pooling over
    time, dropout and a linear classifier.

    Inputs are windows ``(batch, time, channels)`` scaled to [0, 1]; the pooled features make the model
    independent of the window length it is applied to. Dropout takes its key per call (``rngs=``).
    """

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, features: Sequence[int] = (32, 64),
                 kernel_size: int = 5, dropout: float = 0.1, dtype: str = "float32", rngs: nnx.Rngs):
        if len(input_shape) != 2:
            raise ValueError(f"TemporalCNN takes windows of shape (time, channels), got example shape {input_shape}")
        self.dtype = jnp.dtype(dtype)
        channels, in_name = input_shape[-1], None
        self.convs = nnx.List()
        for feats in features:
            self.convs.append(nnx.Conv(channels, feats, kernel_size=(kernel_size,), dtype=self.dtype, rngs=rngs,
                                       **conv_inits(in_name, "conv_out", spatial=1)))
            channels, in_name = feats, "conv_in"
        self.dropout = nnx.Dropout(dropout)
        self.head = nnx.Linear(channels, num_classes, dtype=self.dtype, rngs=rngs, **dense_inits("embed", "classes"))

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        for conv in self.convs:
            x = nnx.relu(conv(x))
            if x.shape[1] >= 2:
                x = nnx.max_pool(x, window_shape=(2,), strides=(2,))
        x = x.mean(axis=1)
        x = self.dropout(x, deterministic=not train, rngs=rngs)
        return self.head(x).astype(jnp.float32)
