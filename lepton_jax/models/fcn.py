"""A small fully convolutional network: per-pixel logits for dense targets (segmentation)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_jax.models.layers import conv_inits


class FCN(nnx.Module):
    """3x3 conv-relu blocks at full resolution ('SAME' padding) and a 1x1 convolution to ``num_classes`` logits per
    pixel: inputs ``(batch, height, width, channels)`` -> ``(batch, height, width, num_classes)``."""

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, features: Sequence[int] = (16, 16),
                 dtype: str = "float32", rngs: nnx.Rngs):
        channels = input_shape[-1]
        self.dtype = jnp.dtype(dtype)
        self.convs = nnx.List()
        for feats in features:
            in_name = None if channels == input_shape[-1] else "conv_in"
            self.convs.append(nnx.Conv(channels, feats, kernel_size=(3, 3), padding="SAME", dtype=self.dtype,
                                       rngs=rngs, **conv_inits(in_name)))
            channels = feats
        self.head = nnx.Conv(channels, num_classes, kernel_size=(1, 1), dtype=self.dtype, rngs=rngs,
                             **conv_inits("conv_in", None))

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        for conv in self.convs:
            x = nnx.relu(conv(x))
        return self.head(x).astype(jnp.float32)
