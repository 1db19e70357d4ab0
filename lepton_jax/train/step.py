"""Pure, jittable train and eval steps over explicit state."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lepton_jax.data.transforms import INPUT, LABEL
from lepton_jax.errors import ConfigError
from lepton_jax.train.state import TrainState

Batch = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_apply(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
    """``apply(params, x, train=False, rngs=None) -> logits``: the model as a pure function of its params."""

    def apply(params, x, *, train: bool = False, rngs: jax.Array | None = None) -> jax.Array:
        return nnx.merge(graphdef, params)(x, train=train, rngs=rngs)

    return apply


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, grad_accum_steps: int = 1
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """One optimizer step on a global batch. Dropout keys derive from (rng, step) only, so the result does not
    depend on how the batch is sharded. With ``grad_accum_steps`` k > 1 the batch is processed as k micro-batches
    in a ``lax.scan`` (rows i, i+k, i+2k, ... form micro-batch i, so no rows move between devices) and the mean
    gradient is applied once."""
    apply = make_apply(graphdef)

    def loss_fn(params, batch: Batch, key: jax.Array):
        logits = apply(params, batch[INPUT], train=True, rngs=key)
        return cross_entropy(logits, batch[LABEL]), logits

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, batch: Batch, key: jax.Array):
        if grad_accum_steps == 1:
            (loss, logits), grads = grad_fn(params, batch, key)
            return loss, jnp.mean(jnp.argmax(logits, -1) == batch["label"]), grads
        k = grad_accum_steps
        micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)

        def body(total, inputs):
            index, mb = inputs
            (loss, logits), grads = grad_fn(params, mb, jax.random.fold_in(key, index))
            accuracy = jnp.mean(jnp.argmax(logits, -1) == mb["label"])
            return jax.tree.map(jnp.add, total, grads), (loss, accuracy)

        zeros = jax.tree.map(jnp.zeros_like, params)
        total, (losses, accuracies) = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
        return losses.mean(), accuracies.mean(), jax.tree.map(lambda g: g / k, total)

    def train_step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(state.rng, state.step)
        loss, accuracy, grads = gradients(state.params, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "accuracy": accuracy,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def build_train_step(config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation
                     ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The train step a config asks for: standard, or an adversarial objective from ``config.robust``.

    Inputs are scaled to the [0, 1] box (see :mod:`lepton_jax.data.transforms`), which is the attack's input box.
    """
    robust = config.get("robust")
    objective = robust.get("objective", "standard") if robust is not None else "standard"
    accum = int(config.get("grad_accum_steps", 1))
    if objective == "standard":
        return make_train_step(graphdef, tx, accum)
    if accum != 1:
        raise ConfigError(f"robust.objective {objective!r} does not support grad_accum_steps={accum} (its attack "
                          "and update run on the whole batch); set grad_accum_steps=1 or lower batch_size")
    from lepton_jax.robust.objectives import make_adversarial_train_step

    return make_adversarial_train_step(graphdef, tx, robust, input_box=(0.0, 1.0))


def optimizer_updates_per_step(config) -> int:
    """Optimizer updates one train step makes: ``robust.free_replays`` for free adversarial training (its replays
    each update the parameters), otherwise 1. Learning-rate schedules count updates, so they span
    ``steps x updates_per_step``."""
    robust = config.get("robust")
    if robust is not None and robust.get("objective", "standard") == "free":
        return int(robust.get("free_replays", 1))
    return 1


def make_predict(graphdef: nnx.GraphDef) -> Callable[[object, jax.Array], jax.Array]:
    """``predict(params, x) -> logits`` in inference mode (no dropout)."""
    apply = make_apply(graphdef)
    return lambda params, x: apply(params, x, train=False)
