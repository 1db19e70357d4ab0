"""A pre-activation ResNet with GroupNorm (BiT-style), sized for small images.

GroupNorm instead of BatchNorm keeps the model stateless (no batch statistics to carry through the train step),
so it shards and checkpoints like any other parameter pytree and does not depend on the per-device batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_jax.models.layers import conv_inits, dense_inits, norm_inits


def _groups(channels: int, groups: int) -> int:
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class ResidualBlock(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, dtype, *, rngs: nnx.Rngs):
        kernel_init = conv_inits()["kernel_init"]
        self.norm1 = nnx.GroupNorm(in_channels, num_groups=_groups(in_channels, groups), dtype=dtype, rngs=rngs,
                                   **norm_inits("conv_in"))
        self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), strides=stride, use_bias=False, dtype=dtype, rngs=rngs,
                              kernel_init=kernel_init)
        self.norm2 = nnx.GroupNorm(out_channels, num_groups=_groups(out_channels, groups), dtype=dtype, rngs=rngs,
                                   **norm_inits("conv_out"))
        self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3), use_bias=False, dtype=dtype, rngs=rngs,
                              kernel_init=kernel_init)
        self.project = nnx.data(None)  # a 1x1 projection where the shape changes
        if stride != 1 or in_channels != out_channels:
            self.project = nnx.Conv(in_channels, out_channels, (1, 1), strides=stride, use_bias=False, dtype=dtype,
                                    rngs=rngs, kernel_init=kernel_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.norm1(x))
        shortcut = self.project(h) if self.project is not None else x
        h = self.conv1(h)
        h = self.conv2(nnx.relu(self.norm2(h)))
        return h + shortcut


class ResNet(nnx.Module):
    """Stem conv, stages of residual blocks (stride 2 between stages), GroupNorm, global average pool, classifier."""

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, widths: Sequence[int] = (32, 64),
                 blocks_per_stage: int = 2, groups: int = 8, dtype: str = "float32", rngs: nnx.Rngs):
        self.dtype = dtype = jnp.dtype(dtype)  # compute dtype; parameters stay float32
        channels = input_shape[-1]
        self.stem = nnx.Conv(channels, widths[0], (3, 3), dtype=dtype, rngs=rngs, **conv_inits(None, "conv_out"))
        self.blocks = nnx.List()
        channels = widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                self.blocks.append(ResidualBlock(channels, width, stride, groups, dtype, rngs=rngs))
                channels = width
        self.norm = nnx.GroupNorm(channels, num_groups=_groups(channels, groups), dtype=dtype, rngs=rngs,
                                  **norm_inits("embed"))
        self.head = nnx.Linear(channels, num_classes, dtype=dtype, rngs=rngs, **dense_inits("embed", "classes"))

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: jax.Array | None = None) -> jax.Array:
        del train, rngs  # no dropout or batch statistics
        x = self.stem(x.astype(self.dtype))
        for block in self.blocks:
            x = block(x)
        x = nnx.relu(self.norm(x)).mean(axis=(1, 2))
        return self.head(x).astype(jnp.float32)
