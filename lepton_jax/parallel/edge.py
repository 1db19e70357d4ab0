"""Edge training math: local SGD / DiLoCo replicas on a ``nodes`` mesh axis.

Each of ``n`` nodes holds its own parameters and inner optimizer state (stacked on a leading ``nodes`` dimension,
sharded over the ``nodes`` mesh axis) and steps on its own data inside ``shard_map`` with **no collectives**. Every
``H`` steps a *sync* (a separately compiled program) averages the parameter deltas

    Δ = θ_outer − mean_k θ_k            (``lax.pmean`` over ``nodes``)

and applies an outer Optax optimizer to Δ as if it were a gradient: θ_outer ← θ_outer − η_out · NesterovSGD(Δ)
(DiLoCo); outer lr 1 without momentum is FedAvg / local SGD, θ_outer ← mean_k θ_k. The synced parameters are then
copied back to every node; inner optimizer states are kept across syncs.

Options: deltas sent as float32 (all-reduced), bfloat16 or int8 (per-tensor scale); the low-precision ones are
all-gathered in their wire dtype and summed in float32 on every node, with error feedback (each node keeps the
rounding residual and adds it to its next delta); *fragments*: the parameter leaves are split into F size-balanced
groups and the k-th sync sends only group ``k mod F`` (so each sync carries ~1/F of the bytes, each parameter
syncs every F·H steps; Streaming DiLoCo's schedule is H = H_target / F).

Everything here is pure and jittable over an explicit :class:`EdgeState`; the loop lives in
:mod:`lepton_jax.train.edge`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lepton_jax.errors import ConfigError
from lepton_jax.parallel.mesh import make_mesh, mesh_config, more_devices_hint

NODES = "nodes"
DELTA_DTYPES = ("float32", "bfloat16", "int8")
Batch = dict[str, jax.Array]
GradFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, jax.Array, Any]]


def shard_map(f: Callable, *, mesh: Mesh, in_specs: Any, out_specs: Any, check: bool = True) -> Callable:
    """``jax.shard_map`` where present (jax >= 0.7), else ``jax.experimental.shard_map.shard_map``."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check)
    from jax.experimental.shard_map import shard_map as legacy

    return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check)


@struct.dataclass
class EdgeState:
    step: jax.Array  # inner steps taken (the same on every node)
    params: Any  # outer (global) parameters, replicated
    outer_opt_state: list  # one outer optimizer state per parameter leaf (leaf order of ``params``)
    node_params: Any  # per-node parameters, leading dimension ``nodes``
    node_opt_state: Any  # per-node inner optimizer states, leading dimension ``nodes``
    error: Any  # per-node error-feedback residuals of low-precision deltas (zeros for float32)
    rng: jax.Array  # node k's dropout key at step s is fold_in(fold_in(rng, s), k)


def outer_optimizer(lr: float, momentum: float = 0.0, nesterov: bool = True) -> optax.GradientTransformation:
    """SGD on the averaged delta: Nesterov momentum for DiLoCo; ``lr=1, momentum=0`` is FedAvg / local SGD."""
    return optax.sgd(lr, momentum=momentum or None, nesterov=bool(nesterov and momentum))


def edge_mesh(nodes: int, devices: list | None = None) -> Mesh:
    """A 1-D mesh ``('nodes',)`` of ``nodes`` devices: one node per device, across processes when there are several
    (each process holding ``nodes / process_count`` consecutive nodes)."""
    devices = list(jax.devices() if devices is None else devices)
    processes = len({d.process_index for d in devices})
    if processes > 1:
        if nodes % processes or nodes // processes != len(devices) // processes:
            raise ConfigError(f"edge.nodes={nodes} must equal the {len(devices)} devices of the {processes} "
                              "processes (one node per device)")
        return make_mesh(mesh_config({NODES: nodes // processes}, dcn_axes={NODES: processes}), devices)
    if nodes > len(devices):
        raise ConfigError(f"edge.nodes={nodes} needs {nodes} devices (one per node), but {len(devices)} are present; "
                          + more_devices_hint(nodes))
    return make_mesh(mesh_config({NODES: nodes}, num_devices=nodes), devices)


def init_state(params: Any, inner_tx: optax.GradientTransformation, outer_tx: optax.GradientTransformation,
               nodes: int, seed: int) -> EdgeState:
    """Every node starts from ``params``; jit it with :func:`state_shardings` to create it already sharded."""
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (nodes, *x.shape)), params)
    return EdgeState(step=jnp.zeros((), jnp.int32), params=params,
                     outer_opt_state=[outer_tx.init(x) for x in jax.tree.leaves(params)],
                     node_params=stacked, node_opt_state=jax.vmap(inner_tx.init)(stacked),
                     error=jax.tree.map(jnp.zeros_like, stacked), rng=jax.random.PRNGKey(seed))


def state_shardings(abstract_state: EdgeState, mesh: Mesh) -> EdgeState:
    """Outer state replicated; per-node trees split over ``nodes`` along their leading dimension."""
    repl, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(NODES))
    return EdgeState(step=repl, params=jax.tree.map(lambda _: repl, abstract_state.params),
                     outer_opt_state=jax.tree.map(lambda _: repl, abstract_state.outer_opt_state),
                     node_params=jax.tree.map(lambda _: split, abstract_state.node_params),
                     node_opt_state=jax.tree.map(lambda _: split, abstract_state.node_opt_state),
                     error=jax.tree.map(lambda _: split, abstract_state.error), rng=repl)


def _local(tree: Any) -> Any:
    return jax.tree.map(lambda x: x[0], tree)


def _stack(tree: Any) -> Any:
    return jax.tree.map(lambda x: x[None], tree)


def make_inner_step(grad_fn: GradFn, inner_tx: optax.GradientTransformation, mesh: Mesh
                    ) -> Callable[[EdgeState, Batch], tuple[EdgeState, dict[str, jax.Array]]]:
    """One local step on every node, without collectives. The batch is laid out as ``nodes`` blocks of rows (block
    k is node k's data) and split over ``nodes``. Returns per-node metrics of shape ``(nodes,)`` (averaging them
    in the program would itself be a collective)."""

    def per_node(step, rng, params, opt_state, batch):
        key = jax.random.fold_in(jax.random.fold_in(rng, step), jax.lax.axis_index(NODES))
        params, opt_state = _local(params), _local(opt_state)
        loss, accuracy, grads = grad_fn(params, batch, key)
        updates, opt_state = inner_tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return _stack(params), _stack(opt_state), {"loss": loss[None], "accuracy": accuracy[None]}

    split = P(NODES)
    mapped = shard_map(per_node, mesh=mesh, in_specs=(P(), P(), split, split, split),
                       out_specs=(split, split, split))

    def inner_step(state: EdgeState, batch: Batch):
        params, opt_state, metrics = mapped(state.step, state.rng, state.node_params, state.node_opt_state, batch)
        return state.replace(step=state.step + 1, node_params=params, node_opt_state=opt_state), metrics

    return inner_step


def participants(seed: int, sync_round: jax.Array, nodes: int, skip_prob: float) -> jax.Array:
    """Which nodes take part in sync round ``sync_round`` (float 0/1 per node): each misses independently with
    probability ``skip_prob``, drawn from ``(seed, round)`` only, so every node and every rerun agrees."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), 0x5EED), sync_round)
    return jax.random.bernoulli(key, 1.0 - skip_prob, (nodes,)).astype(jnp.float32)


def _average_delta(delta: jax.Array, error: jax.Array, dtype: str, nodes: int, weights: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
    """The mean over nodes of ``delta`` sent in ``dtype`` (with error feedback), and the node's new residual.
    With ``weights`` (0/1 per node, every node holding the same vector) the mean is over the nodes with weight 1
    (zero when there are none); a node with weight 0 still takes part in the collective (sending a delta that is
    ignored) and keeps its residual."""
    me = None if weights is None else weights[jax.lax.axis_index(NODES)]
    count = None if weights is None else jnp.maximum(weights.sum(), 1.0)
    if dtype == "float32":
        if weights is None:
            return jax.lax.pmean(delta, NODES), error
        return jax.lax.psum(delta * me, NODES) / count, error
    corrected = delta + error
    if dtype == "bfloat16":
        sent = corrected.astype(jnp.bfloat16)
        residual = corrected - sent.astype(jnp.float32)
        # gathered as raw 16-bit words and summed in float32: an all-reduce would accumulate in bfloat16, and XLA's
        # CPU backend promotes bfloat16 collectives to float32 on the wire
        words = jax.lax.all_gather(jax.lax.bitcast_convert_type(sent, jnp.uint16), NODES)
        values = jax.lax.bitcast_convert_type(words, jnp.bfloat16).astype(jnp.float32)
        if weights is None:
            return values.sum(0) / nodes, residual
        return jnp.tensordot(weights, values, axes=1) / count, jnp.where(me > 0, residual, error)
    scale = jnp.max(jnp.abs(corrected)) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    sent = jnp.clip(jnp.round(corrected / scale), -127, 127).astype(jnp.int8)
    gathered = jax.lax.all_gather(sent, NODES).astype(jnp.float32)  # int8 sums would overflow: gather, then add
    scales = jax.lax.all_gather(scale, NODES)
    residual = corrected - sent.astype(jnp.float32) * scale
    if weights is None:
        return jnp.tensordot(scales, gathered, axes=1) / nodes, residual
    return jnp.tensordot(scales * weights, gathered, axes=1) / count, jnp.where(me > 0, residual, error)


def make_sync(outer_tx: optax.GradientTransformation, mesh: Mesh, leaves: Sequence[int] | None = None,
              delta_dtype: str = "float32", *, weights: Callable[[jax.Array], jax.Array] | None = None
              ) -> Callable[[EdgeState], EdgeState]:
    """The sync of parameter leaves ``leaves`` (indices into ``jax.tree.leaves(params)``; None = all): average
    the deltas over nodes, take an outer optimizer step, copy the result back to every node.

    Partial participation: ``weights(step) -> (nodes,)`` 0/1 marks the nodes that take part in the sync after inner
    step ``step`` (e.g. :func:`participants` of the round). The deltas are averaged over those nodes only and only
    they receive the new outer parameters; a node that misses the round keeps its local parameters, inner optimizer
    state and error-feedback residual and keeps training, so its next delta spans every step since it last synced.
    When no node takes part the outer parameters and optimizer state stay as they were."""
    if delta_dtype not in DELTA_DTYPES:
        raise ConfigError(f"unknown edge.delta_dtype {delta_dtype!r}; use one of {', '.join(DELTA_DTYPES)}")
    nodes = mesh.shape[NODES]

    def per_node(outer, outer_opt, local, error, w):
        w = None if weights is None else w
        joined = None if w is None else w[jax.lax.axis_index(NODES)] > 0
        anyone = None if w is None else w.sum() > 0
        new_outer, new_opt, new_local, new_error = [], [], [], []
        for p, s, x, e in zip(outer, outer_opt, _local(local), _local(error), strict=True):
            mean, e = _average_delta(p - x, e, delta_dtype, nodes, w)
            updates, new_s = outer_tx.update(mean, s, p)
            new_p = optax.apply_updates(p, updates)
            if w is not None:
                new_p = jnp.where(anyone, new_p, p)
                new_s = jax.tree.map(lambda a, b: jnp.where(anyone, a, b), new_s, s)
            new_outer.append(new_p)
            new_opt.append(new_s)
            new_local.append(new_p if w is None else jnp.where(joined, new_p, x))
            new_error.append(e)
        return new_outer, new_opt, _stack(new_local), _stack(new_error)

    split = P(NODES)
    # every node computes the same outer update from the same averaged delta, so the P() outputs are replicated by
    # construction (all_gather results are not inferred as replicated, hence check=False)
    mapped = shard_map(per_node, mesh=mesh, in_specs=(P(), P(), split, split, P()),
                       out_specs=(P(), P(), split, split), check=False)

    def sync(state: EdgeState) -> EdgeState:
        outer, treedef = jax.tree.flatten(state.params)
        local, error = jax.tree.leaves(state.node_params), jax.tree.leaves(state.error)
        chosen = list(range(len(outer))) if leaves is None else list(leaves)
        pick = lambda xs: [xs[i] for i in chosen]  # noqa: E731
        w = jnp.ones((nodes,), jnp.float32) if weights is None else weights(state.step)
        new_outer, new_opt, new_local, new_error = mapped(pick(outer), pick(state.outer_opt_state), pick(local),
                                                          pick(error), w)
        outer_opt = list(state.outer_opt_state)
        for j, i in enumerate(chosen):
            outer[i], outer_opt[i], local[i], error[i] = new_outer[j], new_opt[j], new_local[j], new_error[j]
        unflatten = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
        return state.replace(params=unflatten(outer), outer_opt_state=outer_opt, node_params=unflatten(local),
                             error=unflatten(error))

    return sync


def fragment_leaves(params: Any, fragments: int) -> list[tuple[int, ...]]:
    """Splits the parameter leaves into ``fragments`` groups of near-equal bytes (largest leaf first to the
    lightest group); each group's leaf indices in tree order."""
    sizes = [int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)]
    if not 1 <= fragments <= len(sizes):
        raise ConfigError(f"edge.fragments={fragments} must be between 1 and the {len(sizes)} parameter leaves")
    groups: list[list[int]] = [[] for _ in range(fragments)]
    load = [0] * fragments
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        g = int(np.argmin(load))
        groups[g].append(i)
        load[g] += sizes[i]
    return [tuple(sorted(g)) for g in groups]


def fragment_for_sync(sync_index: int, fragments: int) -> int:
    """Which fragment the ``sync_index``-th sync (0-based) sends."""
    return sync_index % fragments
