"""Initialisers that attach logical axis names to parameters.

Logical names describe what a parameter dimension *is* (``embed``, ``mlp``, ``heads``, ``kv``, ``classes``,
``conv_in``, ``conv_out``, ``patch``); sharding rules in :mod:`lepton_jax.parallel.rules` map them to mesh axes.
Models never see meshes: the names are metadata only (``eager_sharding=False``).
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

Initializer = Callable


def named(init: Initializer, *names: str | None) -> Initializer:
    """``init`` whose parameters carry the logical axis ``names`` (one per dimension)."""
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def dense_inits(in_name: str | None, out_name: str | None) -> dict[str, Initializer]:
    """kernel_init / bias_init for a Dense layer mapping ``in_name`` -> ``out_name``."""
    return {"kernel_init": named(nnx.initializers.lecun_normal(), in_name, out_name),
            "bias_init": named(nnx.initializers.zeros_init(), out_name)}


def conv_inits(in_name: str | None = "conv_in", out_name: str | None = "conv_out",
               spatial: int = 2) -> dict[str, Initializer]:
    """kernel_init / bias_init for a convolution (kernel layout: *spatial, in, out)."""
    return {"kernel_init": named(nnx.initializers.lecun_normal(), *([None] * spatial), in_name, out_name),
            "bias_init": named(nnx.initializers.zeros_init(), out_name)}


def norm_inits(name: str | None) -> dict[str, Initializer]:
    """scale_init / bias_init for LayerNorm / GroupNorm over a ``name`` feature axis."""
    return {"scale_init": named(nnx.initializers.ones_init(), name),
            "bias_init": named(nnx.initializers.zeros_init(), name)}
