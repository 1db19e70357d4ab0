"""Pure, jittable train and eval steps over explicit state."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lepton_jax.train.state import TrainState

Batch = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_apply(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
    """``apply(params, x, train=False, rngs=None) -> logits``: the model as a pure function of its params."""

    def apply(params, x, *, train: bool = False, rngs: jax.Array | None = None) -> jax.Array:
        return nnx.merge(graphdef, params)(x, train=train, rngs=rngs)

    return apply


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """One optimizer step on a global batch. Dropout keys derive from (rng, step) only, so the result does not
    depend on how the batch is sharded."""
    apply = make_apply(graphdef)

    def loss_fn(params, batch: Batch, key: jax.Array):
        logits = apply(params, batch["image"], train=True, rngs=key)
        return cross_entropy(logits, batch["label"]), logits

    def train_step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(state.rng, state.step)
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def build_train_step(config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation
                     ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The train step a config asks for: standard, or an adversarial objective from ``config.robust``.

    Inputs are images in the [0, 1] box (see :mod:`lepton_jax.data.transforms`), which is the attack's input box.
    """
    robust = config.get("robust")
    objective = robust.get("objective", "standard") if robust is not None else "standard"
    if objective == "standard":
        return make_train_step(graphdef, tx)
    from lepton_jax.robust.objectives import make_adversarial_train_step

    return make_adversarial_train_step(graphdef, tx, robust, input_box=(0.0, 1.0))


def make_predict(graphdef: nnx.GraphDef) -> Callable[[object, jax.Array], jax.Array]:
    """``predict(params, x) -> logits`` in inference mode (no dropout)."""
    apply = make_apply(graphdef)
    return lambda params, x: apply(params, x, train=False)
