"""Adversarial-training objectives as train steps with the standard step's signature.

``config.robust.objective`` selects one (``build_train_step`` dispatches here for anything but ``"standard"``):

* ``fgsm``    — Goodfellow et al. 2015: w·CE(x) + (1 − w)·CE(x_fgsm), w = ``fgsm_clean_weight``, FGSM step ε.
* ``fgsm_rs`` — "fast" AT, Wong et al. 2020: uniform random start in the ε-ball, one step of ``fgsm_rs_step``·ε
  (1.25ε), projected; loss CE(x_adv).
* ``pgd``     — PGD-AT, Madry et al. 2018: CE on a PGD-``steps`` example (random start, α = ``step_size``·ε).
* ``free``    — free AT, Shafahi et al. 2019: ``free_replays`` (m) replays of the same batch inside one step.
  Each replay does one forward/backward pass in train mode on x + δ and uses it twice: the parameter gradient
  for an optimizer update and the input gradient for δ ← Π(δ + ``free_step``·ε·dir(∇ₓ)). One call therefore
  applies m optimizer updates (the optimizer's own step count, and so its schedule, advance by m; use a constant
  schedule or one sized for m× the loop's steps, and divide the epochs by m as the paper does). The paper carries
  δ over from the previous minibatch; to keep the step a pure function of (state, batch) δ starts instead from a
  uniform draw in the ε-ball — for a new batch the carried δ is equally unrelated to the examples. The input
  gradient comes from the training forward pass (dropout on): that shared pass is what makes it "free".
* ``trades``  — Zhang et al. 2019: CE(x) + β·KL(p(x) ‖ p(x_adv)), x_adv maximising the KL by PGD from
  x + 0.001·N(0, 1); β = ``trades_beta``.

Attacks run the model in inference mode (except free AT's shared pass, above). Dropout keys are
``fold_in(rng, step)`` exactly as in the standard step, and attack keys ``fold_in(fold_in(rng, step), 1)``, so
results do not depend on the mesh, and ε = 0 (or β = 0) reproduces the standard step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from lepton_jax.data.transforms import INPUT, LABEL
from lepton_jax.errors import ConfigError
from lepton_jax.models.functional import cross_entropy, make_apply
from lepton_jax.robust import attacks

Batch = dict[str, jax.Array]
OBJECTIVES = ("standard", "fgsm", "fgsm_rs", "pgd", "free", "trades")
SINGLE_STEP = ("fgsm", "fgsm_rs", "free")
_ATTACK_TAG = 1


def default_robust_config(**overrides) -> ml_collections.ConfigDict:
    """The ``config.robust`` section with every key (configs override what they need)."""
    c = ml_collections.ConfigDict()
    c.objective = "standard"      # standard | fgsm | fgsm_rs | pgd | free | trades
    c.norm = "linf"               # linf | l2, in the model's input units ([0, 1] images)
    c.epsilon = 0.1
    c.step_size = 0.25            # PGD step as a fraction of ε (α = step_size·ε)
    c.steps = 7                   # PGD steps for pgd / trades training
    c.random_init = True          # PGD-AT random start
    c.attack_loss = "ce"          # ce | cw (pgd training)
    c.fgsm_clean_weight = 0.5     # fgsm: weight of the clean loss
    c.fgsm_rs_step = 1.25         # fgsm_rs: step as a fraction of ε (Wong et al. 2020)
    c.free_replays = 4            # free: m
    c.free_step = 1.0             # free: δ step as a fraction of ε
    c.trades_beta = 6.0
    c.eval_steps = 20             # robust evaluation: PGD steps and restarts
    c.eval_restarts = 3
    c.monitor = True              # catastrophic-overfitting monitor for single-step objectives
    c.monitor_examples = 256      # held-out (dev) examples it attacks each epoch
    c.monitor_gap = 0.2           # flag when FGSM accuracy − PGD accuracy exceeds this
    c.monitor_drop = 0.2          # flag when PGD accuracy falls this far below its best epoch
    c.monitor_early_stop = False  # stop training when flagged
    c.update(overrides)
    return c


def check_robust_config(rc: ml_collections.ConfigDict) -> None:
    if rc.objective not in OBJECTIVES:
        raise ConfigError(f"unknown robust.objective {rc.objective!r}; use one of {', '.join(OBJECTIVES)}")
    if rc.norm not in attacks.NORMS:
        raise ConfigError(f"unknown robust.norm {rc.norm!r}; use linf or l2")
    if rc.attack_loss not in attacks.LOSSES:
        raise ConfigError(f"unknown robust.attack_loss {rc.attack_loss!r}; use ce or cw")
    if not math.isfinite(rc.epsilon) or rc.epsilon < 0 or rc.step_size <= 0 or rc.steps < 1 or rc.free_replays < 1:
        raise ConfigError("robust: need a finite epsilon >= 0, step_size > 0, steps >= 1, free_replays >= 1; got "
                          f"epsilon={rc.epsilon}, step_size={rc.step_size}, steps={rc.steps}, "
                          f"free_replays={rc.free_replays}")
    for key in ("monitor_examples", "eval_steps", "eval_restarts"):
        if rc[key] < 1:
            raise ConfigError(f"robust.{key} must be >= 1, got {rc[key]}")
    for key in ("monitor_gap", "monitor_drop"):
        if not math.isfinite(rc[key]):  # negative values are allowed: they flag every evaluation
            raise ConfigError(f"robust.{key} must be finite, got {rc[key]}")


def make_adversarial_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                                robust_config: ml_collections.ConfigDict, input_box: attacks.Box = (0.0, 1.0)
                                ) -> Callable[[Any, Batch], tuple[Any, dict[str, jax.Array]]]:
    """``train_step(state, batch) -> (state, metrics)`` for ``robust_config.objective``.

    Metrics: the standard keys (loss, accuracy on the inputs the loss is computed on, grad_norm, param_norm,
    update_norm) plus clean_accuracy (inference mode), adv_accuracy, adv_loss and delta_norm (mean ‖x_adv − x‖,
    which stays 0 if an attack silently does nothing).
    """
    rc = default_robust_config()
    rc.update(robust_config.to_dict() if isinstance(robust_config, ml_collections.ConfigDict) else robust_config)
    check_robust_config(rc)
    if rc.objective == "standard":
        raise ConfigError("objective 'standard' uses lepton_jax.train.step.make_train_step")
    apply = make_apply(graphdef)
    norm, eps, box = rc.norm, float(rc.epsilon), input_box

    def train_logits(params, x, key):
        return apply(params, x, train=True, rngs=key)

    def adversarial(params, x, y, key):
        if rc.objective == "fgsm":
            return attacks.fgsm(apply, params, x, y, epsilon=eps, norm=norm, box=box)
        if rc.objective == "fgsm_rs":
            return attacks.pgd(apply, params, x, y, key, epsilon=eps, norm=norm, box=box, steps=1,
                               step_size=rc.fgsm_rs_step, random_init=True, keep_best=False)
        return attacks.pgd(apply, params, x, y, key, epsilon=eps, norm=norm, box=box, steps=rc.steps,
                           step_size=rc.step_size, random_init=rc.random_init, loss=rc.attack_loss, keep_best=False)

    def loss_fn(params, x, x_adv, y, key):
        adv_logits = train_logits(params, x_adv, key)
        adv_loss = cross_entropy(adv_logits, y)
        if rc.objective == "fgsm":
            clean_loss = cross_entropy(train_logits(params, x, key), y)
            w = rc.fgsm_clean_weight
            return w * clean_loss + (1.0 - w) * adv_loss, (adv_logits, adv_loss)
        if rc.objective == "trades":
            clean_logits = train_logits(params, x, key)
            kl = _kl(clean_logits, adv_logits)
            return cross_entropy(clean_logits, y) + rc.trades_beta * kl, (clean_logits, kl)
        return adv_loss, (adv_logits, adv_loss)

    def trades_example(params, x, key):
        reference = jax.lax.stop_gradient(apply(params, x, train=False))
        start = attacks.project(x, x + 0.001 * jax.random.normal(key, x.shape, x.dtype), eps, norm, box)
        x_adv, _, _ = attacks.perturb(lambda z: apply(params, z, train=False), lambda z: _kl(reference, z, False),
                                      x, start, epsilon=eps, norm=norm, box=box, steps=rc.steps,
                                      step_size=rc.step_size)
        return x_adv

    def metrics_for(params, new_params, grads, updates, x, x_adv, y, loss, logits, adv_loss):
        adv_acc = jnp.mean(jnp.argmax(apply(params, x_adv, train=False), -1) == y)
        return {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(new_params),
            "update_norm": optax.tree.norm(updates),
            "clean_accuracy": jnp.mean(jnp.argmax(apply(params, x, train=False), -1) == y),
            "adv_accuracy": adv_acc,
            "adv_loss": adv_loss,
            "delta_norm": jnp.mean(attacks.perturbation_norm(x_adv - x, norm)),
        }

    def train_step(state: Any, batch: Batch):
        x, y = batch[INPUT], batch[LABEL]
        key = jax.random.fold_in(state.rng, state.step)
        attack_key = jax.random.fold_in(key, _ATTACK_TAG)
        if rc.objective == "free":
            return _free_step(state, x, y, key, attack_key)
        params = state.params
        if rc.objective == "trades":
            x_adv = trades_example(params, x, attack_key)
        else:
            x_adv = adversarial(params, x, y, attack_key)
        x_adv = jax.lax.stop_gradient(x_adv)
        (loss, (logits, adv_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, x_adv, y, key)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics = metrics_for(params, new_params, grads, updates, x, x_adv, y, loss, logits, adv_loss)
        return state.replace(step=state.step + 1, params=new_params, opt_state=opt_state), metrics

    def _free_step(state, x, y, key, attack_key):
        def replay_loss(params, x_adv, k):
            logits = train_logits(params, x_adv, k)
            return cross_entropy(logits, y), logits

        def replay(i, carry):
            params, opt_state, x_adv, loss_sum, _, _ = carry
            (loss, logits), (g_params, g_x) = jax.value_and_grad(replay_loss, argnums=(0, 1), has_aux=True)(
                params, x_adv, jax.random.fold_in(key, i))
            updates, opt_state = tx.update(g_params, opt_state, params)
            params = optax.apply_updates(params, updates)
            x_adv = attacks.project(x, x_adv + rc.free_step * eps * attacks.ascent_direction(g_x, norm), eps,
                                    norm, box)
            return params, opt_state, x_adv, loss_sum + loss, jnp.mean(jnp.argmax(logits, -1) == y), \
                optax.tree.norm(g_params)

        start = attacks.random_start(attack_key, x, eps, norm, box)
        zero = jnp.zeros((), jnp.float32)
        params, opt_state, x_adv, loss_sum, acc, gnorm = jax.lax.fori_loop(
            0, rc.free_replays, replay, (state.params, state.opt_state, start, zero, zero, zero))
        moved = jax.tree.map(lambda a, b: a - b, params, state.params)
        loss = loss_sum / rc.free_replays
        metrics = {
            "loss": loss, "accuracy": acc, "grad_norm": gnorm, "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(moved),
            "clean_accuracy": jnp.mean(jnp.argmax(apply(params, x, train=False), -1) == y),
            "adv_accuracy": jnp.mean(jnp.argmax(apply(params, x_adv, train=False), -1) == y),
            "adv_loss": loss,
            "delta_norm": jnp.mean(attacks.perturbation_norm(x_adv - x, norm)),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _kl(reference_logits: jax.Array, logits: jax.Array, mean: bool = True) -> jax.Array:
    """KL(softmax(reference) ‖ softmax(logits)) per example (or its batch mean)."""
    p_log = jax.nn.log_softmax(reference_logits)
    kl = jnp.sum(jnp.exp(p_log) * (p_log - jax.nn.log_softmax(logits)), axis=-1)
    return jnp.mean(kl) if mean else kl
