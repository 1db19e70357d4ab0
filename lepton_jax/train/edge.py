"""Edge training strategy: local SGD / DiLoCo over a ``nodes`` mesh axis (math in :mod:`lepton_jax.parallel.edge`).

``config.edge.nodes > 1`` selects it (the loop is :mod:`lepton_jax.train.loop`; this module holds only the strategy)::

    edge.nodes          replicas, one per device, within or across processes
    edge.sync_every     H: inner steps between syncs
    edge.outer_lr       outer SGD learning rate on the averaged delta (1.0 + momentum 0 = FedAvg / local SGD)
    edge.outer_momentum Nesterov momentum of the outer SGD (DiLoCo: 0.9)
    edge.delta_dtype    float32 | bfloat16 | int8 (low precision with error feedback)
    edge.fragments      F: the k-th sync sends parameter group k mod F
    edge.split          iid | label: how the training split is partitioned over nodes

``config.optim`` is the inner optimizer (per node), ``config.batch_size`` the global batch (nodes x per-node rows).
Each node streams its own partition of the lake split through Grain; checkpoints hold the outer parameters under
``params`` (what ``lepton-jax eval/predict`` restore), the outer optimizer state, every node's parameters, inner
optimizer state and error-feedback buffers, and the Grain iterator, so a resume between syncs is exact.
"""

from __future__ import annotations

import math
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lepton_jax.checkpoint import PARAMS
from lepton_jax.data import LakeDataSource, ShuffledBatches, host_slice, prepare_batch
from lepton_jax.data.pipeline import augmented
from lepton_jax.data.transforms import INPUT, LABEL
from lepton_jax.errors import ConfigError
from lepton_jax.models.functional import cross_entropy, make_apply, make_predict
from lepton_jax.parallel import edge as edge_math
from lepton_jax.parallel.build import build
from lepton_jax.parallel.comm import compiled_bytes, wire_bytes
from lepton_jax.parallel.edge import NODES, EdgeState
from lepton_jax.train.optim import make_optimizer, make_schedule
from lepton_jax.train.strategy import Strategy, grain_read_options

SPLITS = ("iid", "label")


def make_grad_fn(graphdef: nnx.GraphDef) -> edge_math.GradFn:
    """``(params, batch, key) -> (loss, accuracy, grads)`` of the model's cross-entropy."""
    apply = make_apply(graphdef)

    def loss_fn(params, batch, key):
        logits = apply(params, batch[INPUT], train=True, rngs=key)
        return cross_entropy(logits, batch[LABEL]), logits

    grad = jax.value_and_grad(loss_fn, has_aux=True)

    def grad_fn(params, batch, key):
        (loss, logits), grads = grad(params, batch, key)
        return loss, jnp.mean(jnp.argmax(logits, -1) == batch["label"]), grads

    return grad_fn


def node_partitions(num_examples: int, nodes: int, split: str, seed: int, labels: np.ndarray | None = None
                    ) -> np.ndarray:
    """``(nodes, m)`` example indices, ``m = num_examples // nodes``: a random partition (``iid``), or contiguous
    blocks of the examples sorted by label (``label``: each node sees a few classes), each row in random order."""
    rng = np.random.default_rng([seed, nodes])
    m = num_examples // nodes
    if split == "iid":
        order = rng.permutation(num_examples)
    elif split == "label":
        if labels is None:
            raise ConfigError("edge.split='label' needs the training labels")
        order = np.lexsort((rng.random(num_examples), np.asarray(labels)))
    else:
        raise ConfigError(f"unknown edge.split {split!r}; use {' or '.join(SPLITS)}")
    parts = order[: nodes * m].reshape(nodes, m)
    return np.stack([rng.permutation(row) for row in parts])


def node_dataset(source: LakeDataSource, partitions: np.ndarray, *, per_node_batch: int, seed: int,
                 num_epochs: int | None, schema: dict[str, Any], process_index: int | None = None,
                 process_count: int | None = None, read_options: grain.ReadOptions | None = None,
                 augment: Any = ()) -> grain.IterDataset:
    """Global batches of ``nodes x per_node_batch`` rows, node k's block drawn from its own partition row (shuffled
    differently each epoch); this process reads only its rows (its nodes' blocks), augmented as ``augment`` says."""
    nodes, m = partitions.shape
    if per_node_batch > m:
        raise ConfigError(f"per-node batch {per_node_batch} exceeds the {m} examples each node holds")
    rows = host_slice(nodes * per_node_batch, process_index, process_count)

    def load(positions) -> dict[str, np.ndarray]:
        idx = partitions[:, np.asarray(positions)].reshape(-1)[rows]
        return prepare_batch(source.__getitems__(idx), schema)

    ds = (ShuffledBatches(m, per_node_batch, seed)
          .repeat(num_epochs)
          .map(load))
    return augmented(ds, augment, rows, seed).to_iter_dataset(read_options)


class EdgeStrategy(Strategy):
    """Local SGD / DiLoCo over a ``nodes`` mesh axis: the compiled inner step, one sync per fragment and a full
    sync, with the collective bytes of each (payload per device, see :mod:`lepton_jax.parallel.comm`)."""

    name = "edge"

    def __init__(self, config: ml_collections.ConfigDict, schema: dict[str, Any], train_source: LakeDataSource,
                 devices: list | None = None, *, total_steps: int | None = None):
        self.config = config
        self.edge = edge = config.edge
        self.mesh = mesh = edge_math.edge_mesh(edge.nodes, devices)
        self.per_node = config.batch_size // edge.nodes
        self.partitions = None
        if train_source is not None:
            labels = train_source.reader.read()[schema["label_array"]] if edge.split == "label" else None
            self.partitions = node_partitions(len(train_source), edge.nodes, edge.split, config.seed, labels)
            self.steps_per_epoch = self.partitions.shape[1] // self.per_node
            if self.steps_per_epoch < 1:
                raise ConfigError(f"per-node batch {self.per_node} exceeds the {self.partitions.shape[1]} examples "
                                  "each node holds")
            self.total_steps = self.steps_per_epoch * config.num_epochs
        else:  # programs only (communication accounting)
            self.steps_per_epoch = self.total_steps = int(total_steps)
        self.built = built = build(config, schema, mesh, replicate=True)
        self.updates_per_step = 1
        self.schedule = make_schedule(config.optim, self.total_steps)
        self.inner_tx = make_optimizer(config.optim, self.total_steps)
        self.outer_tx = edge_math.outer_optimizer(edge.outer_lr, edge.outer_momentum)

        def init() -> EdgeState:
            return edge_math.init_state(built.init_params(), self.inner_tx, self.outer_tx, edge.nodes, config.seed)

        self._init = init
        abstract = jax.eval_shape(init)
        self.shardings = sh = edge_math.state_shardings(abstract, mesh)
        self.abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, sh)
        self.data_sharding = self.eval_sharding = data_sh = NamedSharding(mesh, P(NODES))
        self.replicated = NamedSharding(mesh, P())
        batch = {INPUT: jax.ShapeDtypeStruct((config.batch_size, *built.input_shape), jnp.float32,
                                             sharding=data_sh),
                 LABEL: jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=data_sh)}
        self.inner_step = jax.jit(edge_math.make_inner_step(make_grad_fn(built.graphdef), self.inner_tx, mesh),
                                  in_shardings=(sh, data_sh), out_shardings=(sh, data_sh),
                                  donate_argnums=0).lower(self.abstract, batch).compile()
        self.fragments = edge_math.fragment_leaves(built.abstract_params, edge.fragments)
        self.syncs = [self._compile_sync(leaves) for leaves in self.fragments]
        self.full_sync = self.syncs[0] if edge.fragments == 1 else self._compile_sync(None)
        self.predict = jax.jit(make_predict(built.graphdef), in_shardings=(self.replicated, data_sh),
                               out_shardings=data_sh)
        self.inner_bytes = compiled_bytes(self.inner_step)
        self.sync_bytes = [compiled_bytes(s) for s in self.syncs]
        self.full_sync_bytes = compiled_bytes(self.full_sync)
        # what each device sends under the ring model (an all-gather of bf16/int8 deltas grows with the nodes)
        self.inner_wire = wire_bytes(self.inner_step.as_text())
        self.sync_wire = [wire_bytes(s.as_text()) for s in self.syncs]
        self.full_sync_wire = wire_bytes(self.full_sync.as_text())
        self.eval_batch = config.eval_batch_size + (-config.eval_batch_size) % edge.nodes
        self.num_params, self.param_bytes = built.num_params, built.param_bytes

    def _compile_sync(self, leaves):
        e, seed = self.edge, self.config.seed
        weights = None
        if e.skip_prob > 0:  # round r = the sync after inner steps r*H+1 .. (r+1)*H (the final sync: the last round)
            def weights(step):
                return edge_math.participants(seed, (step - 1) // e.sync_every, e.nodes, e.skip_prob)
        sync = edge_math.make_sync(self.outer_tx, self.mesh, leaves, e.delta_dtype, weights=weights)
        return jax.jit(sync, in_shardings=(self.shardings,), out_shardings=self.shardings,
                       donate_argnums=0).lower(self.abstract).compile()

    def init_state(self, params: Any = None) -> EdgeState:
        if params is None:
            return jax.jit(self._init, out_shardings=self.shardings)()
        return jax.jit(lambda p: edge_math.init_state(p, self.inner_tx, self.outer_tx, self.config.edge.nodes,
                                                      self.config.seed), out_shardings=self.shardings)(params)

    def items(self, state: EdgeState) -> dict[str, Any]:
        """Outer parameters as ``params`` (what eval/predict restore); outer optimizer, node states, error
        feedback, step and rng as ``edge``."""
        return {PARAMS: state.params, "edge": {"step": state.step, "rng": state.rng,
                                               "outer": state.outer_opt_state, "node_params": state.node_params,
                                               "node_opt_state": state.node_opt_state, "error": state.error}}

    def abstract_items(self) -> dict[str, Any]:
        return self.items(self.abstract)

    def from_items(self, items: dict[str, Any]) -> EdgeState:
        e = items["edge"]
        return EdgeState(step=e["step"], params=items[PARAMS], outer_opt_state=list(e["outer"]),
                         node_params=e["node_params"], node_opt_state=e["node_opt_state"], error=e["error"],
                         rng=e["rng"])

    def batches(self, source: LakeDataSource, schema: dict[str, Any]) -> Any:
        return iter(node_dataset(source, self.partitions, per_node_batch=self.per_node, seed=self.config.seed,
                                 num_epochs=self.config.num_epochs, schema=schema,
                                 read_options=grain_read_options(self.config.prefetch), augment=self.config.augment))

    def step(self, state: EdgeState, batch: Any) -> tuple[EdgeState, dict[str, jax.Array]]:
        return self.inner_step(state, batch)

    def after_step(self, state: EdgeState, step: int) -> EdgeState:
        """Syncs when ``step`` ends a period of H, and a final full sync after the last step (so the outer
        parameters include the last steps)."""
        h = self.edge.sync_every
        if step % h == 0:
            return self.syncs[edge_math.fragment_for_sync(step // h - 1, self.edge.fragments)](state)
        if step == self.total_steps:
            return self.full_sync(state)
        return state

    def copy_metrics(self, window: list[dict[str, jax.Array]]) -> list[dict[str, jax.Array]]:
        """Each per-node metric array copied on its own (:meth:`fetch_metrics` all-gathers them across processes)."""
        for m in window:
            for values in m.values():
                values.copy_to_host_async()
        return window

    def fetch_metrics(self, copying: list[dict[str, jax.Array]]) -> list[dict[str, float]]:
        """Per-node metrics (every process's nodes) reduced to means, plus the spread of the loss over nodes."""
        out = []
        for m in copying:
            host = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in m.items()}
            out.append({**{k: float(v.mean()) for k, v in host.items()},
                        "loss_node_spread": float(np.ptp(host["loss"]))})
        return out

    def step_info(self, step: int) -> dict[str, Any]:
        return {"comm_bytes": self.bytes_through(step)}

    def communication(self) -> dict[str, Any]:
        return {"inner_step_bytes": self.inner_bytes, "sync_bytes": self.sync_bytes,
                "full_sync_bytes": self.full_sync_bytes, "param_bytes": self.param_bytes,
                "bytes_total": self.bytes_through(self.total_steps),
                "ring_wire_sync_bytes": self.sync_wire,
                "ring_wire_bytes_total": self.bytes_through(self.total_steps, wire=True)}

    def run_info(self) -> dict[str, Any]:
        return {"edge": self.edge.to_dict(), "communication": self.communication()}

    def describe(self) -> str:
        e, comm = self.edge, self.communication()
        return (f"edge: {e.nodes} nodes, sync every {e.sync_every} steps ({e.split} split, {e.delta_dtype} deltas, "
                f"{e.fragments} fragment(s)"
                + (f", each node misses a sync with probability {e.skip_prob}" if e.skip_prob else "")
                + f"), {e.nodes} x {self.per_node} rows per step; collective bytes per "
                f"device: inner step {self.inner_bytes:,}, sync {self.sync_bytes}, whole run {comm['bytes_total']:,}")

    def summary_extra(self, for_summary: bool = False) -> dict[str, Any]:
        if for_summary:
            return {"bytes_communicated": self.bytes_through(self.total_steps),
                    "ring_wire_bytes": self.bytes_through(self.total_steps, wire=True)}
        return {"communication": self.communication(), "program": self}

    def flops(self, state: EdgeState, batch: Any) -> float | None:
        analysis = self.inner_step.cost_analysis()
        if isinstance(analysis, list):
            analysis = analysis[0] if analysis else {}
        value = (analysis or {}).get("flops")
        return float(value) if value and value > 0 else None

    def bytes_through(self, step: int, total_steps: int | None = None, *, wire: bool = False) -> int:
        """Collective bytes per device by steps 1..``step`` (inner steps and syncs): payload, or with ``wire``
        the bytes sent under the ring model (:func:`lepton_jax.parallel.comm.wire_bytes`)."""
        total_steps = self.total_steps if total_steps is None else total_steps
        h, f = self.edge.sync_every, self.edge.fragments
        inner, syncs, full = ((self.inner_wire, self.sync_wire, self.full_sync_wire) if wire else
                              (self.inner_bytes, self.sync_bytes, self.full_sync_bytes))
        total = inner * step + sum(syncs[edge_math.fragment_for_sync(k, f)] for k in range(step // h))
        if step == total_steps and step % h:
            total += full
        return total


def dp_step_bytes(config: ml_collections.ConfigDict, *, example_shape: tuple[int, ...], num_classes: int,
                  axes: dict[str, int], rules: str = "dp", min_size: int = 0, devices: list | None = None,
                  hlo: bool = False, wire: bool = False) -> int | str:
    """Collective bytes per device of one synchronous train step of ``config`` on a mesh with ``axes`` (``wire``:
    bytes sent under the ring model instead of payload; ``hlo``: the compiled program's text instead)."""
    from lepton_jax.parallel.mesh import batch_sharding, make_mesh, mesh_config
    from lepton_jax.parallel.rules import state_shardings
    from lepton_jax.train.state import create_state
    from lepton_jax.train.step import build_train_step

    mesh = make_mesh(mesh_config(axes, num_devices=math.prod(axes.values())), devices)
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.sharding.update({"rules": rules, "min_size": min_size})
    built = build(cfg, _schema(example_shape, num_classes), mesh)
    graphdef, abstract_params, param_sh = built.graphdef, built.abstract_params, built.shardings
    tx = make_optimizer(config.optim, 1000)
    abstract_state = jax.eval_shape(lambda p: create_state(p, tx, config.seed), abstract_params)
    state_sh = state_shardings(abstract_state, param_sh, mesh)
    data_sh = batch_sharding(mesh)
    batch = {INPUT: jax.ShapeDtypeStruct((config.batch_size, *example_shape), jnp.float32),
             LABEL: jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
    compiled = jax.jit(build_train_step(config, graphdef, tx, mesh=mesh, param_specs=built.specs),
                       in_shardings=(state_sh, data_sh),
                       out_shardings=(state_sh, NamedSharding(mesh, P()))).lower(abstract_state, batch).compile()
    if hlo:
        return compiled.as_text()
    return wire_bytes(compiled.as_text()) if wire else compiled_bytes(compiled)


def communication_report(config: ml_collections.ConfigDict, *, example_shape: tuple[int, ...], num_classes: int,
                         devices: list | None = None) -> list[dict[str, Any]]:
    """Collective bytes per device per optimizer step for data parallel, FSDP, local SGD and DiLoCo (at the
    config's ``edge.sync_every`` and ``edge.delta_dtype``), each measured from its compiled programs."""
    edge = config.edge
    n, h = edge.nodes, edge.sync_every
    rows = [{"strategy": "data parallel", "bytes_per_step": dp_step_bytes(
                config, example_shape=example_shape, num_classes=num_classes, axes={"data": n}, devices=devices)},
            {"strategy": "FSDP", "bytes_per_step": dp_step_bytes(
                config, example_shape=example_shape, num_classes=num_classes, axes={"fsdp": n}, rules="fsdp",
                devices=devices)}]
    variants = {f"local SGD (H={h})": {"outer_lr": 1.0, "outer_momentum": 0.0, "delta_dtype": "float32"},
                f"DiLoCo (H={h}, {edge.delta_dtype})": {}}
    for name, overrides in variants.items():
        cfg = ml_collections.ConfigDict(config.to_dict())
        cfg.edge.update(overrides)
        program = EdgeStrategy(cfg, _schema(example_shape, num_classes), None, devices, total_steps=h)
        # F consecutive syncs (F x H steps) send every parameter once
        per_period = program.inner_bytes * h * edge.fragments + sum(program.sync_bytes)
        rows.append({"strategy": name, "bytes_per_step": per_period / (h * edge.fragments)})
    dp = rows[0]["bytes_per_step"]
    for row in rows:
        row["ratio_to_dp"] = dp / row["bytes_per_step"] if row["bytes_per_step"] else math.inf
    return rows


def _schema(example_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """A minimal lake schema (input shape and classes) for building programs without a table."""
    return {"input_array": "input", "label_array": "label", "label_names": [str(i) for i in range(num_classes)],
            "arrays": {"input": {"example_shape": list(example_shape)}}}
