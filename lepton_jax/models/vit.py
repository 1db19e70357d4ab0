"""A Vision Transformer (pre-LayerNorm encoder, learned position embeddings, mean-pooled tokens)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lepton_jax.models.layers import dense_inits, named, norm_inits


class EncoderBlock(nnx.Module):
    def __init__(self, width: int, num_heads: int, mlp_dim: int, dropout: float, dtype, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs, **norm_inits("embed"))
        self.attention = nnx.MultiHeadAttention(
            num_heads=num_heads, in_features=width, decode=False, dtype=dtype, rngs=rngs,
            kernel_init=named(nnx.initializers.lecun_normal(), "embed", "heads", "kv"),
            out_kernel_init=named(nnx.initializers.lecun_normal(), "heads", "kv", "embed"),
            bias_init=named(nnx.initializers.zeros_init(), "heads", "kv"),
            out_bias_init=named(nnx.initializers.zeros_init(), "embed"))
        self.norm2 = nnx.LayerNorm(width, dtype=dtype, rngs=rngs, **norm_inits("embed"))
        self.mlp_in = nnx.Linear(width, mlp_dim, dtype=dtype, rngs=rngs, **dense_inits("embed", "mlp"))
        self.mlp_out = nnx.Linear(mlp_dim, width, dtype=dtype, rngs=rngs, **dense_inits("mlp", "embed"))
        self.dropout = nnx.Dropout(dropout)

    def __call__(self, x: jax.Array, train: bool, rngs: jax.Array | None) -> jax.Array:
        keys = jax.random.split(rngs, 2) if rngs is not None else (None, None)
        h = self.attention(self.norm1(x), deterministic=True)
        x = x + self.dropout(h, deterministic=not train, rngs=keys[0])
        h = self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))
        return x + self.dropout(h, deterministic=not train, rngs=keys[1])


class ViT(nnx.Module):
    """Patchify with a strided convolution, add position embeddings, encode, mean-pool, classify."""

    def __init__(self, *, input_shape: tuple[int, ...], num_classes: int, patch: int = 2, width: int = 64,
                 depth: int = 2, num_heads: int = 4, mlp_dim: int = 128, dropout: float = 0.0,
                 dtype: str = "float32", rngs: nnx.Rngs):
        self.dtype = dtype = jnp.dtype(dtype)  # compute dtype; parameters stay float32
        height, width_px, channels = input_shape
        self.patchify = nnx.Conv(channels, width, (patch, patch), strides=patch, padding="VALID", dtype=dtype,
                                 rngs=rngs,
                                 kernel_init=named(nnx.initializers.lecun_normal(), None, None, "patch", "embed"),
                                 bias_init=named(nnx.initializers.zeros_init(), "embed"))
        tokens = (height // patch) * (width_px // patch)
        self.position = nnx.Param(named(nnx.initializers.normal(0.02), None, "embed")(rngs.params(), (tokens, width)))
        self.blocks = nnx.List([EncoderBlock(width, num_heads, mlp_dim, dropout, dtype, rngs=rngs)
                                for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs, **norm_inits("embed"))
        self.head = nnx.Linear(width, num_classes, dtype=dtype, rngs=rngs, **dense_inits("embed", "classes"))

    def __call__(self, x: jax.Array, *, train: bool = False, rngs: jax.Array | None = None) -> jax.Array:
        x = self.patchify(x.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.position[...].astype(self.dtype)
        keys = jax.random.split(rngs, len(self.blocks)) if rngs is not None else [None] * len(self.blocks)
        for block, key in zip(self.blocks, keys, strict=True):
            x = block(x, train, key)
        return self.head(self.norm(x).mean(axis=1)).astype(jnp.float32)
