"""Pure, jittable train and eval steps over explicit state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lepton_jax.data.transforms import INPUT, LABEL
from lepton_jax.errors import ConfigError
from lepton_jax.models.functional import cross_entropy, make_apply, make_predict
from lepton_jax.parallel.mesh import batch_axes, data_parallel_size
from lepton_jax.tasks import Classification, Task
from lepton_jax.train.state import TrainState

__all__ = ["build_train_step", "cross_entropy", "make_apply", "make_predict", "make_train_step",
           "optimizer_updates_per_step"]

Batch = dict[str, jax.Array]
DATA = "data"


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, grad_accum_steps: int = 1, *,
                    mesh: Mesh | None = None, param_specs: Any = None, task: Task | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """One optimizer step on ``task``'s loss (default: classification's cross-entropy; its step metric is logged
    beside the loss under ``task.step_metric_name``) on a global batch. Dropout keys derive from (rng, step) only,
    so without accumulation the result does not depend on how the batch is sharded.

    With ``grad_accum_steps`` k > 1 the batch is processed as k micro-batches in a ``lax.scan`` (rows i, i+k,
    i+2k, ... form micro-batch i, so no rows move between devices) and the mean gradient is applied once. On a
    ``mesh`` whose axes of size > 1 are all batch axes (``data``, ``fsdp``: G devices, G > 1; parameters
    replicated or FSDP-sharded) each device accumulates the gradient of its own rows *unreduced* (``shard_map``,
    over parameters gathered once before the loop), so the cross-device reduction (FSDP: into the parameters'
    shards) and the metric means happen once per step, after the scan: no collective inside the micro-batch loop.
    Device g's dropout key is ``fold_in(micro-batch key, g)``: with dropout, accumulated steps then depend on G
    (without dropout they do not). With tensor-parallel parameters the partitioner reduces each micro-batch's
    gradient."""
    apply = make_apply(graphdef)
    task = Classification({}) if task is None else task
    # every mesh axis of size > 1 a batch axis (data parallel, FSDP): accumulate per-device gradients inside
    # shard_map and reduce once after the loop
    axes = batch_axes(mesh) if mesh is not None else ()
    local = (mesh is not None and grad_accum_steps > 1 and all(n == 1 or a in axes for a, n in mesh.shape.items())
             and data_parallel_size(mesh) > 1)
    groups = data_parallel_size(mesh) if local else 1

    def loss_fn(params, batch: Batch, key: jax.Array):
        logits = apply(params, batch[INPUT], train=True, rngs=key)
        return task.loss(logits, batch[LABEL]), logits

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    local_grads = None
    if local:
        from lepton_jax.parallel.edge import shard_map

        def device_grads(params, mb, micro_key):
            (loss, logits), grads = grad_fn(params, mb, jax.random.fold_in(micro_key, jax.lax.axis_index(axes)))
            accuracy = task.step_metric(logits, mb[LABEL])
            return loss[None], accuracy[None], jax.tree.map(lambda x: x[None], grads)

        # check=False: the gradient of the replicated params stays per-device (with replication checking, JAX would
        # insert a psum for it here, i.e. inside the micro-batch loop)
        local_grads = shard_map(device_grads, mesh=mesh, in_specs=(P(), P(axes), P()),
                                out_specs=(P(axes), P(axes), P(axes)), check=False)

    def gradients(params, batch: Batch, key: jax.Array):
        if grad_accum_steps == 1:
            (loss, logits), grads = grad_fn(params, batch, key)
            return loss, task.step_metric(logits, batch[LABEL]), grads
        k = grad_accum_steps
        micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)
        if local_grads is None:  # the partitioner reduces each micro-batch's gradient (FSDP: a reduce-scatter)
            def body(total, inputs):
                index, mb = inputs
                (loss, logits), grads = grad_fn(params, mb, jax.random.fold_in(key, index))
                accuracy = task.step_metric(logits, mb[LABEL])
                return jax.tree.map(jnp.add, total, grads), (loss, accuracy)

            zeros = jax.tree.map(jnp.zeros_like, params)
            total, (losses, accuracies) = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
            return losses.mean(), accuracies.mean(), jax.tree.map(lambda t: t / k, total)

        full = jax.lax.with_sharding_constraint(params, NamedSharding(mesh, P()))  # FSDP: one all-gather, here

        def body(total, inputs):  # per-device gradients and metrics, unreduced: no collective inside the loop
            index, mb = inputs
            loss, accuracy, grads = local_grads(full, mb, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, total, grads), (loss, accuracy)

        zeros = jax.tree.map(lambda x: jnp.zeros((groups, *x.shape), x.dtype), params)
        total, (losses, accuracies) = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
        grads = jax.tree.map(lambda t: t.sum(0) / (k * groups), total)
        if param_specs is not None:  # reduced straight into each parameter's layout (FSDP: a reduce-scatter)
            grads = jax.tree.map(lambda g, spec: jax.lax.with_sharding_constraint(g, NamedSharding(mesh, spec)),
                                 grads, param_specs, is_leaf=lambda x: isinstance(x, P))
        return losses.mean(), accuracies.mean(), grads

    def train_step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(state.rng, state.step)
        loss, accuracy, grads = gradients(state.params, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            task.step_metric_name: accuracy,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def build_train_step(config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *,
                     mesh: Mesh | None = None, param_specs: Any = None, task: Task | None = None
                     ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The train step a config asks for: standard (on ``task``'s loss), or an adversarial objective from
    ``config.robust`` (classification only).

    Inputs are scaled to the [0, 1] box (see :mod:`lepton_jax.data.transforms`), which is the attack's input box.
    """
    robust = config.robust
    objective = robust.objective
    accum = int(config.grad_accum_steps)
    if objective == "standard":
        return make_train_step(graphdef, tx, accum, mesh=mesh, param_specs=param_specs, task=task)
    if accum != 1:
        raise ConfigError(f"robust.objective {objective!r} does not support grad_accum_steps={accum} (its attack "
                          "and update run on the whole batch); set grad_accum_steps=1 or lower batch_size")
    if task is not None and task.name != "classification":
        raise ConfigError(f"robust.objective {objective!r} trains classifiers only; task {task.name!r} needs "
                          "robust.objective='standard'")
    from lepton_jax.robust.objectives import make_adversarial_train_step

    return make_adversarial_train_step(graphdef, tx, robust, input_box=(0.0, 1.0))


def optimizer_updates_per_step(config) -> int:
    """Optimizer updates one train step makes: ``robust.free_replays`` for free adversarial training (its replays
    each update the parameters), otherwise 1. Learning-rate schedules count updates, so they span
    ``steps x updates_per_step``."""
    robust = config.robust
    return int(robust.free_replays) if robust.objective == "free" else 1
