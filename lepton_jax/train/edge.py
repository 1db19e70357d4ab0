"""Edge training loop: local SGD / DiLoCo over a ``nodes`` mesh axis (math in :mod:`lepton_jax.parallel.edge`).

``config.edge`` (absent or ``nodes <= 1`` = ordinary training) selects it::

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
import time
from pathlib import Path
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

from lepton_jax import tracking
from lepton_jax.checkpoint import Checkpointer, abstract_like
from lepton_jax.data import LakeDataSource, ShuffledBatches, host_slice, prepare_batch, to_global
from lepton_jax.data.transforms import INPUT, LABEL
from lepton_jax.errors import ConfigError, TrainingDivergedError
from lepton_jax.lake import Lake
from lepton_jax.models import build_model
from lepton_jax.parallel import edge as edge_math
from lepton_jax.parallel.comm import compiled_bytes
from lepton_jax.parallel.edge import NODES, EdgeState
from lepton_jax.train.loop import Preemption, _evaluate, _say, finish_run
from lepton_jax.train.optim import make_optimizer
from lepton_jax.train.state import TrainState, count_params, split_model
from lepton_jax.train.step import cross_entropy, make_apply, make_predict

SPLITS = ("iid", "label")


def edge_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.edge`` with defaults filled in and checked."""
    edge = config.get("edge")
    if edge is None:
        raise ConfigError("config has no edge section; see configs/edge_diloco.py")
    out = ml_collections.ConfigDict({"nodes": 4, "sync_every": 32, "outer_lr": 0.7, "outer_momentum": 0.9,
                                     "delta_dtype": "float32", "fragments": 1, "split": "iid"})
    out.update(edge.to_dict())
    if out.nodes < 1 or out.sync_every < 1 or out.fragments < 1:
        raise ConfigError(f"edge.nodes, edge.sync_every and edge.fragments must be >= 1, got {out.nodes}, "
                          f"{out.sync_every}, {out.fragments}")
    if out.split not in SPLITS:
        raise ConfigError(f"unknown edge.split {out.split!r}; use {' or '.join(SPLITS)}")
    if out.delta_dtype not in edge_math.DELTA_DTYPES:
        raise ConfigError(f"unknown edge.delta_dtype {out.delta_dtype!r}; use one of "
                          f"{', '.join(edge_math.DELTA_DTYPES)}")
    if config.batch_size % out.nodes:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by edge.nodes={out.nodes}")
    return out


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
                 process_count: int | None = None) -> grain.IterDataset:
    """Global batches of ``nodes x per_node_batch`` rows, node k's block drawn from its own partition row (shuffled
    differently each epoch); this process reads only its rows (its nodes' blocks)."""
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
    return ds.to_iter_dataset()


def to_train_state(state: EdgeState) -> TrainState:
    """The checkpoint layout: outer parameters as ``params`` (restored by eval/predict), the rest as opt_state."""
    return TrainState(step=state.step, params=state.params, rng=state.rng,
                      opt_state={"outer": state.outer_opt_state, "node_params": state.node_params,
                                 "node_opt_state": state.node_opt_state, "error": state.error})


def from_train_state(state: TrainState) -> EdgeState:
    o = state.opt_state
    return EdgeState(step=state.step, params=state.params, outer_opt_state=list(o["outer"]),
                     node_params=o["node_params"], node_opt_state=o["node_opt_state"], error=o["error"],
                     rng=state.rng)


class EdgeProgram:
    """The compiled programs of one edge configuration: inner step, one sync per fragment and a full sync, with
    the collective bytes of each (payload per device, see :mod:`lepton_jax.parallel.comm`)."""

    def __init__(self, config: ml_collections.ConfigDict, *, example_shape: tuple[int, ...], num_classes: int,
                 total_steps: int, devices: list | None = None):
        self.edge = edge = edge_settings(config)
        self.mesh = mesh = edge_math.edge_mesh(edge.nodes, devices)
        self.config = config

        def new_model() -> nnx.Module:
            return build_model(config.model, input_shape=tuple(example_shape), num_classes=num_classes,
                               seed=config.seed)

        self.graphdef, abstract_params = split_model(nnx.eval_shape(new_model))
        self.num_params = count_params(abstract_params)
        self.param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_params))
        self.inner_tx = make_optimizer(config.optim, total_steps)
        self.outer_tx = edge_math.outer_optimizer(edge.outer_lr, edge.outer_momentum)

        def init() -> EdgeState:
            return edge_math.init_state(split_model(new_model())[1], self.inner_tx, self.outer_tx, edge.nodes,
                                        config.seed)

        self.init = init
        abstract = jax.eval_shape(init)
        self.shardings = sh = edge_math.state_shardings(abstract, mesh)
        self.abstract = abstract_like(abstract, sh)
        self.data_sharding = data_sh = NamedSharding(mesh, P(NODES))
        self.replicated = NamedSharding(mesh, P())
        batch = {INPUT: jax.ShapeDtypeStruct((config.batch_size, *example_shape), jnp.float32, sharding=data_sh),
                 LABEL: jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=data_sh)}
        self.inner_step = jax.jit(edge_math.make_inner_step(make_grad_fn(self.graphdef), self.inner_tx, mesh),
                                  in_shardings=(sh, data_sh), out_shardings=(sh, data_sh),
                                  donate_argnums=0).lower(self.abstract, batch).compile()
        self.fragments = edge_math.fragment_leaves(abstract_params, edge.fragments)
        self.syncs = [self._compile_sync(leaves) for leaves in self.fragments]
        self.full_sync = self.syncs[0] if edge.fragments == 1 else self._compile_sync(None)
        self.predict = jax.jit(make_predict(self.graphdef), in_shardings=(self.replicated, data_sh),
                               out_shardings=data_sh)
        self.inner_bytes = compiled_bytes(self.inner_step)
        self.sync_bytes = [compiled_bytes(s) for s in self.syncs]
        self.full_sync_bytes = compiled_bytes(self.full_sync)

    def _compile_sync(self, leaves):
        sync = edge_math.make_sync(self.outer_tx, self.mesh, leaves, self.edge.delta_dtype)
        return jax.jit(sync, in_shardings=(self.shardings,), out_shardings=self.shardings,
                       donate_argnums=0).lower(self.abstract).compile()

    def create_state(self) -> EdgeState:
        return jax.jit(self.init, out_shardings=self.shardings)()

    def after_step(self, state: EdgeState, step: int, total_steps: int) -> tuple[EdgeState, int]:
        """Syncs when ``step`` ends a period of H (or is the last step); returns the state and the bytes sent."""
        h = self.edge.sync_every
        if step % h == 0:
            f = edge_math.fragment_for_sync(step // h - 1, self.edge.fragments)
            return self.syncs[f](state), self.sync_bytes[f]
        if step == total_steps:  # a final full sync, so the outer parameters include the last steps
            return self.full_sync(state), self.full_sync_bytes
        return state, 0

    def bytes_through(self, step: int, total_steps: int) -> int:
        """Collective bytes per device sent by steps 1..``step`` (inner steps and syncs)."""
        h, f = self.edge.sync_every, self.edge.fragments
        total = self.inner_bytes * step + sum(self.sync_bytes[edge_math.fragment_for_sync(k, f)]
                                              for k in range(step // h))
        if step == total_steps and step % h:
            total += self.full_sync_bytes
        return total


def train_edge(config: ml_collections.ConfigDict, workdir: str | Path, *, lake_root: str | Path | None = None,
               devices: list | None = None, progress: bool = True, stop_after_step: int | None = None,
               program: EdgeProgram | None = None) -> dict[str, Any]:
    """Trains ``config`` with the edge strategy and evaluates the outer parameters; returns a summary (also saved
    in ``workdir``, with the same run files as :func:`lepton_jax.train.loop.train_and_evaluate`).

    ``stop_after_step`` stops like a preemption after that step (checkpoint saved; rerun to resume). ``program``
    reuses the compiled programs of an earlier run of the same config (tests, sweeps)."""
    lake = Lake(lake_root or config.data.lake)
    version = config.data.version if config.data.version > 0 else None
    table = lake.table(config.data.table, version)
    schema, label_names = table.schema, table.label_names
    train_src, dev_src, test_src = (LakeDataSource(table.reader(s)) for s in ("train", "dev", "test"))
    edge = edge_settings(config)
    per_node = config.batch_size // edge.nodes
    labels = train_src.reader.read()[schema["label_array"]] if edge.split == "label" else None
    partitions = node_partitions(len(train_src), edge.nodes, edge.split, config.seed, labels)
    steps_per_epoch = partitions.shape[1] // per_node
    total_steps = steps_per_epoch * config.num_epochs
    eval_every = int(config.get("eval_every_steps", 0)) or steps_per_epoch
    example_shape = tuple(prepare_batch(train_src.__getitems__(np.arange(1)), schema)[INPUT].shape[1:])
    if program is None or program.config.to_dict() != config.to_dict():
        program = EdgeProgram(config, example_shape=example_shape, num_classes=len(label_names),
                              total_steps=total_steps, devices=devices)
    mesh, data_sh, repl = program.mesh, program.data_sharding, program.replicated
    predict = program.predict
    eval_batch = config.get("eval_batch_size", 256)
    eval_batch += (-eval_batch) % edge.nodes

    run = tracking.RunDir(workdir)
    run.check_same_config(config)
    data_info = {"lake": str(lake.root.resolve()), "table": table.table, "version": table.version,
                 "schema": schema, "source_sha256": table.record["lineage"]["source"]["sha256"]}
    comm = {"inner_step_bytes": program.inner_bytes, "sync_bytes": program.sync_bytes,
            "full_sync_bytes": program.full_sync_bytes, "param_bytes": program.param_bytes,
            "bytes_total": program.bytes_through(total_steps, total_steps)}
    run.start(config, extra={"data": data_info, "seed": config.seed, "mesh": dict(mesh.shape),
                             "num_params": program.num_params, "edge": edge.to_dict(), "communication": comm})
    ckpt = Checkpointer(run.checkpoint_dir, max_to_keep=config.checkpoint.max_to_keep, best_metric="dev_accuracy")
    _say(progress, f"edge training: {edge.nodes} nodes, sync every {edge.sync_every} steps "
                   f"({edge.split} split, {edge.delta_dtype} deltas, {edge.fragments} fragment(s)); {total_steps} "
                   f"steps of {edge.nodes} x {per_node} rows; collective bytes per device: inner step "
                   f"{program.inner_bytes:,}, sync {program.sync_bytes}, whole run {comm['bytes_total']:,}")

    state = program.create_state()
    batches = iter(node_dataset(train_src, partitions, per_node_batch=per_node, seed=config.seed,
                                num_epochs=config.num_epochs, schema=schema))
    start_step = 0
    if ckpt.latest_step() is not None:
        restored, data_state = ckpt.restore(to_train_state(program.abstract))
        state = from_train_state(restored)
        batches.set_state(data_state)
        start_step = int(jax.device_get(state.step))
        run.truncate_metrics(after_step=start_step)
        run.log(step=start_step, resumed_from_step=start_step)
        _say(progress, f"resuming from checkpoint step {start_step} in {run.checkpoint_dir}")

    history: dict[str, list] = {"step": [], "loss": [], "dev_accuracy": []}
    log_every = max(1, int(config.get("log_every_steps", 10)))
    pending: list = []
    start = last_log = time.perf_counter()
    with Preemption() as preemption:
        for step in range(start_step + 1, total_steps + 1):
            state, step_metrics = program.inner_step(state, to_global(next(batches), data_sh))
            state, _ = program.after_step(state, step, total_steps)
            pending.append(step_metrics)
            stop = preemption.requested or step == stop_after_step
            boundary = step % eval_every == 0 or step == total_steps or stop
            if len(pending) == log_every or boundary:
                fetched = [{k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in m.items()}
                           for m in pending]
                now = time.perf_counter()
                step_time, last_log = (now - last_log) / len(fetched), now
                losses = [float(m["loss"].mean()) for m in fetched]
                history["step"] += list(range(step - len(fetched) + 1, step + 1))
                history["loss"] += losses
                run.log(step=step, epoch=(step - 1) // steps_per_epoch + 1, train_loss=float(np.mean(losses)),
                        train_accuracy=float(np.mean([m["accuracy"].mean() for m in fetched])),
                        train_loss_node_spread=float(np.mean([np.ptp(m["loss"]) for m in fetched])),
                        comm_bytes=program.bytes_through(step, total_steps), step_time_s=step_time,
                        examples_per_s=config.batch_size / step_time)
                if not np.all(np.isfinite(losses)):
                    ckpt.close()
                    run.close()
                    raise TrainingDivergedError(f"edge training diverged: the loss became NaN or inf by step {step}"
                                                "; lower optim.lr or edge.outer_lr")
                pending = []
            if boundary:
                dev = _evaluate(predict, state.params, dev_src, schema, eval_batch, data_sh)
                history["dev_accuracy"].append(dev["accuracy"])
                run.log(step=step, epoch=(step - 1) // steps_per_epoch + 1, dev_loss=dev["loss"],
                        dev_accuracy=dev["accuracy"], elapsed_s=time.perf_counter() - start)
                ckpt.save(to_train_state(state), {"dev_accuracy": dev["accuracy"], "dev_loss": dev["loss"]},
                          data_state=batches.get_state())
                _say(progress, f"step {step}: train loss {history['loss'][-1]:.4f}  dev accuracy "
                               f"{dev['accuracy']:.4f}  bytes {program.bytes_through(step, total_steps):,}")
            if stop:
                ckpt.close()
                run.log(step=step, preempted=True)
                run.close()
                return {"preempted": True, "steps": step, "history": history, "final_state": state,
                        "communication": comm, "program": program}
    summary, best_params, report = finish_run(
        run, ckpt, abstract_params=abstract_like(state.params, repl), predict=predict, test_src=test_src,
        schema=schema, eval_batch=eval_batch, data_sharding=data_sh, history=history,
        train_seconds=time.perf_counter() - start, steps=int(jax.device_get(state.step)),
        data_version=table.version, extra={"bytes_communicated": comm["bytes_total"]})
    best_step = summary["best_step"]
    _say(progress, f"test accuracy {report['accuracy']:.4f} (outer parameters, checkpoint step {best_step}); "
                   f"{comm['bytes_total']:,} collective bytes per device")
    return {**summary, "history": history, "params": best_params, "final_state": state, "report": report,
            "communication": comm, "program": program}


def dp_step_bytes(config: ml_collections.ConfigDict, *, example_shape: tuple[int, ...], num_classes: int,
                  axes: dict[str, int], rules: str = "dp", min_size: int = 0, devices: list | None = None) -> int:
    """Collective bytes per device of one synchronous train step of ``config`` on a mesh with ``axes``."""
    from lepton_jax.parallel.mesh import batch_sharding, make_mesh
    from lepton_jax.parallel.rules import PRESETS, logical_axes, named_shardings, param_specs, state_shardings
    from lepton_jax.train.state import create_state
    from lepton_jax.train.step import build_train_step

    mesh = make_mesh(ml_collections.ConfigDict({"axes": axes, "num_devices": math.prod(axes.values())}), devices)
    model = nnx.eval_shape(lambda: build_model(config.model, input_shape=example_shape, num_classes=num_classes,
                                               seed=config.seed))
    graphdef, abstract_params = split_model(model)
    param_sh = named_shardings(param_specs(logical_axes(model), abstract_params, PRESETS[rules], mesh, min_size),
                               mesh)
    tx = make_optimizer(config.optim, 1000)
    abstract_state = jax.eval_shape(lambda p: create_state(p, tx, config.seed), abstract_params)
    state_sh = state_shardings(abstract_state, param_sh, mesh)
    data_sh = batch_sharding(mesh)
    batch = {INPUT: jax.ShapeDtypeStruct((config.batch_size, *example_shape), jnp.float32),
             LABEL: jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
    compiled = jax.jit(build_train_step(config, graphdef, tx), in_shardings=(state_sh, data_sh),
                       out_shardings=(state_sh, NamedSharding(mesh, P()))).lower(abstract_state, batch).compile()
    return compiled_bytes(compiled)


def communication_report(config: ml_collections.ConfigDict, *, example_shape: tuple[int, ...], num_classes: int,
                         devices: list | None = None) -> list[dict[str, Any]]:
    """Collective bytes per device per optimizer step for data parallel, FSDP, local SGD and DiLoCo (at the
    config's ``edge.sync_every`` and ``edge.delta_dtype``), each measured from its compiled programs."""
    edge = edge_settings(config)
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
        program = EdgeProgram(cfg, example_shape=example_shape, num_classes=num_classes, total_steps=h,
                              devices=devices)
        # F consecutive syncs (F x H steps) send every parameter once
        per_period = program.inner_bytes * h * edge.fragments + sum(program.sync_bytes)
        rows.append({"strategy": name, "bytes_per_step": per_period / (h * edge.fragments)})
    dp = rows[0]["bytes_per_step"]
    for row in rows:
        row["ratio_to_dp"] = dp / row["bytes_per_step"] if row["bytes_per_step"] else math.inf
    return rows
