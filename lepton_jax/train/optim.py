"""Optimizers from config, built from small Optax pieces.

Weight decay comes in two forms:

* ``coupled``: L2 added to the gradient before the optimizer's own transform, so for SGD the update is
  θ ← θ − η∇L − ηλθ (with Adam the decay term is rescaled by the second-moment estimate, like L2 in the loss);
* ``decoupled``: AdamW / SGDW, θ ← θ − η·update(∇L) − ηλθ, the decay bypassing the adaptive scaling.

Only weight matrices and convolution kernels are decayed: parameters named ``kernel`` (Linear, Conv, the q/k/v/out
projections of attention). Biases (including attention's ``(heads, head_dim)`` biases), norm scales and biases and
the ViT's learned position embedding (``position``) are never decayed; the choice is by name, not by rank.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from lepton_jax.errors import ConfigError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
DECAYS = ("decoupled", "coupled")
DECAYED_NAMES = ("kernel",)


def decay_mask(params) -> object:
    """True for leaves that are decayed: those whose own name is in :data:`DECAYED_NAMES` (kernels)."""

    def decayed(path, _) -> bool:
        last = path[-1] if path else None
        name = getattr(last, "key", getattr(last, "name", None))
        return str(name) in DECAYED_NAMES

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    lr = config.lr
    warmup = int(config.warmup_steps)
    kind = config.schedule
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup), alpha=config.final_lr_frac)
    elif kind == "linear":
        main = optax.linear_schedule(lr, lr * config.final_lr_frac, max(1, total_steps - warmup))
    else:
        raise ConfigError(f"unknown optim.schedule {kind!r}; use constant, cosine or linear")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """``config`` (``config.optim``, every key in configs/digits_cnn.py): name (adamw|sgd), lr, schedule, warmup_steps,
    final_lr_frac, weight_decay, decay (decoupled|coupled), momentum, nesterov, b1, b2, clip_norm (0 = off)."""
    schedule = make_schedule(config, total_steps)
    wd = float(config.weight_decay)
    mode = config.decay
    if mode not in ("decoupled", "coupled"):
        raise ConfigError(f"unknown optim.decay {mode!r}; use decoupled or coupled")
    if config.name == "adamw":
        direction = optax.scale_by_adam(b1=config.b1, b2=config.b2)
    elif config.name == "sgd":
        momentum = config.momentum
        direction = optax.trace(decay=momentum, nesterov=config.nesterov) if momentum else optax.identity()
    else:
        raise ConfigError(f"unknown optim.name {config.name!r}; use adamw or sgd")
    decay = optax.add_decayed_weights(wd, mask=decay_mask) if wd else optax.identity()
    parts = []
    if config.clip_norm:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    parts += [decay, direction] if mode == "coupled" else [direction, decay]
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)
