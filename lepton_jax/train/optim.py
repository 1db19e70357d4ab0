"""Optimizers from config, built from small Optax pieces.

Weight decay comes in two forms:

* ``coupled``: L2 added to the gradient before the optimizer's own transform, so for SGD the update is
  θ ← θ − η∇L − ηλθ (with Adam the decay term is rescaled by the second-moment estimate, like L2 in the loss);
* ``decoupled``: AdamW / SGDW, θ ← θ − η·update(∇L) − ηλθ, the decay bypassing the adaptive scaling.

By default only kernels (leaves with rank ≥ 2) are decayed: biases and norm scales are spared.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from lepton_jax.errors import ConfigError


def decay_mask(params) -> object:
    """True for leaves that are decayed: matrices and convolution kernels, not biases or scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    lr = config.lr
    warmup = int(config.get("warmup_steps", 0))
    kind = config.get("schedule", "constant")
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup), alpha=config.get("final_lr_frac", 0.0))
    elif kind == "linear":
        main = optax.linear_schedule(lr, lr * config.get("final_lr_frac", 0.0), max(1, total_steps - warmup))
    else:
        raise ConfigError(f"unknown optim.schedule {kind!r}; use constant, cosine or linear")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """``config``: name (adamw|sgd), lr, schedule, warmup_steps, weight_decay, decay (decoupled|coupled),
    momentum, nesterov, b1, b2, clip_norm (0 = off)."""
    schedule = make_schedule(config, total_steps)
    wd = float(config.get("weight_decay", 0.0))
    mode = config.get("decay", "decoupled")
    if mode not in ("decoupled", "coupled"):
        raise ConfigError(f"unknown optim.decay {mode!r}; use decoupled or coupled")
    if config.name == "adamw":
        direction = optax.scale_by_adam(b1=config.get("b1", 0.9), b2=config.get("b2", 0.999))
    elif config.name == "sgd":
        momentum = config.get("momentum", 0.0)
        direction = optax.trace(decay=momentum, nesterov=config.get("nesterov", False)) if momentum else \
            optax.identity()
    else:
        raise ConfigError(f"unknown optim.name {config.name!r}; use adamw or sgd")
    decay = optax.add_decayed_weights(wd, mask=decay_mask) if wd else optax.identity()
    parts = []
    if config.get("clip_norm", 0.0):
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    parts += [decay, direction] if mode == "coupled" else [direction, decay]
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)
