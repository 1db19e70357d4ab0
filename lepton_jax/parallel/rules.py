"""Sharding rules: logical parameter axes -> mesh axes, with presets and a size floor.

Rules are an ordered list of ``(logical_name, mesh_axis)``. For each parameter dimension the first rule naming its
logical axis whose mesh axis exists with size > 1, is not used by another dimension of the same parameter, and
divides the dimension wins; otherwise the dimension is replicated. Parameters with fewer than ``min_size``
elements stay fully replicated (sharding them costs more in collectives than it saves in memory).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lepton_jax.errors import ConfigError

Rules = tuple[tuple[str, str | None], ...]

PRESETS: dict[str, Rules] = {
    # pure data parallelism: every parameter replicated
    "dp": (),
    # fully sharded data parallelism: split one large dimension of each kernel over 'fsdp'
    "fsdp": (("embed", "fsdp"), ("mlp", "fsdp"), ("conv_out", "fsdp"), ("conv_in", "fsdp"), ("heads", "fsdp")),
    # FSDP + tensor parallelism (Megatron-style: hidden/heads over 'tensor', model width over 'fsdp'). Convolutions
    # are FSDP-only here: splitting every conv's output channels over 'tensor' (without alternating column/row
    # splits) all-gathered activations around each conv (scripts/comm_table.py prints both layouts' bytes)
    "fsdp_tp": (("mlp", "tensor"), ("heads", "tensor"), ("embed", "fsdp"), ("conv_out", "fsdp"),
                ("conv_in", "fsdp"), ("mlp", "fsdp")),
}


def rules_from_config(config: ml_collections.ConfigDict | None) -> tuple[Rules, int]:
    """(rules, min_size) from ``config.sharding`` (``rules``: a preset name or a list of pairs)."""
    if config is None:
        return PRESETS["dp"], 0
    rules = config.rules
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ConfigError(f"unknown sharding.rules preset {rules!r}; presets: {', '.join(PRESETS)}")
        rules = PRESETS[rules]
    return tuple((str(a), None if b is None else str(b)) for a, b in rules), int(config.min_size)


def logical_axes(model: nnx.Module) -> Any:
    """The logical PartitionSpec of each parameter, as a pure dict matching ``split_model``'s params."""
    _, params = nnx.split(model, nnx.Param)
    return nnx.to_pure_dict(nnx.get_partition_spec(params))


def spec_for(logical: P, shape: tuple[int, ...], rules: Rules, mesh: Mesh, min_size: int = 0) -> P:
    """The mesh PartitionSpec of one parameter."""
    if math.prod(shape) < min_size or not logical:
        return P()
    used: set[str] = set()
    out: list[str | None] = []
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical)), strict=True):
        chosen = None
        for logical_name, axis in rules:
            if (name == logical_name and axis is not None and mesh.shape.get(axis, 1) > 1 and axis not in used
                    and dim % mesh.shape[axis] == 0):
                chosen = axis
                break
        if chosen:
            used.add(chosen)
        out.append(chosen)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def param_specs(logical: Any, abstract_params: Any, rules: Rules, mesh: Mesh, min_size: int = 0) -> Any:
    return jax.tree.map(lambda lg, p: spec_for(lg, tuple(p.shape), rules, mesh, min_size), logical, abstract_params,
                        is_leaf=lambda x: isinstance(x, P))


def named_shardings(specs: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def state_shardings(abstract_tree: Any, params_sharding: Any, mesh: Mesh) -> Any:
    """Shardings for any pytree holding parameter-shaped subtrees (optimizer moments, train state): a leaf whose
    key path ends with a parameter's key path and has its shape gets that parameter's sharding; others replicate."""
    by_path = {_keys(path): sharding for path, sharding in jax.tree_util.tree_flatten_with_path(params_sharding)[0]}
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = _keys(path)
        for start in range(len(keys)):
            sharding = by_path.get(keys[start:])
            if sharding is not None and _fits(sharding, getattr(leaf, "shape", ())):
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def _fits(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
    spec = tuple(sharding.spec)
    if len(spec) > len(shape):
        return False
    return all(axis is None or dim % sharding.mesh.shape[axis] == 0 for axis, dim in zip(spec, shape, strict=False))


def _keys(path) -> tuple:
    out = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                out.append(getattr(entry, attr))
                break
    return tuple(out)


def sharding_table(abstract_params: Any, specs: Any, mesh: Mesh) -> str:
    """A table of every parameter: shape, PartitionSpec and bytes per device."""
    rows = []
    total = per_device = 0
    flat_specs = dict(jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        spec = flat_specs[path]
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
        split = math.prod(mesh.shape[a] for a in jax.tree.leaves(tuple(spec)) if a is not None)
        total += nbytes
        per_device += nbytes // split
        rows.append((jax.tree_util.keystr(path), str(tuple(leaf.shape)), str(spec), f"{nbytes // split:,}"))
    rows.append(("total", "", f"mesh {dict(mesh.shape)}", f"{per_device:,} of {total:,}"))
    widths = [max(len(r[i]) for r in rows + [("parameter", "shape", "spec", "bytes/device")]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("parameter", "shape", "spec", "bytes/device"), widths,
                                                    strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
