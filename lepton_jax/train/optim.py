"""Optimizers from config, built from small Optax pieces.

Weight decay comes in two forms:

* ``coupled``: L2 added to the gradient before the optimizer's own transform, so for SGD the update is
  θ ← θ − η∇L − ηλθ (with Adam the decay term is rescaled by the second-moment estimate, like L2 in the loss);
* ``decoupled``: AdamW / SGDW, θ ← θ − η·update(∇L) − ηλθ, the decay bypassing the adaptive scaling.

Only weight matrices and convolution kernels are decayed: parameters named ``kernel`` (Linear, Conv, the q/k/v/out
projections of attention). Biases (including attention's ``(heads, head_dim)`` biases), norm scales and biases and
the ViT's learned position embedding (``position``) are never decayed; the choice is by name, not by rank.

Parameter groups (fine-tuning), by regular expressions matched in full against '/'-joined parameter paths
(``convs/0/kernel``, ``head/bias``): ``optim.freeze`` names parameters that are never updated (their gradients are
zeroed before clipping and their updates are ``optax.set_to_zero()``, weight decay included, so they stay
bit-identical), and ``optim.lr_multipliers`` ``((pattern, multiplier), ...)`` scales the learning rate (and with it
the decoupled decay) of the parameters a pattern matches (the first matching pattern wins), all through
``optax.multi_transform``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import ml_collections
import optax

from lepton_jax.errors import ConfigError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
DECAYS = ("decoupled", "coupled")
DECAYED_NAMES = ("kernel",)
FROZEN, DEFAULT_GROUP = "frozen", "default"


def param_path(path: tuple) -> str:
    """A parameter's key path as the '/'-joined string patterns match (``convs/0/kernel``)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def compile_patterns(what: str, patterns: Any) -> list[re.Pattern]:
    if isinstance(patterns, str):
        raise ConfigError(f"{what} must be a tuple of regular expressions, e.g. ('head/.*',), got the string "
                          f"{patterns!r}")
    try:
        return [re.compile(str(p)) for p in patterns]
    except re.error as e:
        raise ConfigError(f"{what}: invalid regular expression ({e})") from e


def check_param_groups(config: ml_collections.ConfigDict) -> None:
    """One-line :class:`ConfigError` for bad ``optim.freeze`` / ``optim.lr_multipliers``."""
    compile_patterns("optim.freeze", config.freeze)
    for item in config.lr_multipliers:
        ok = (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[1], int | float)
              and not isinstance(item[1], bool) and math.isfinite(item[1]) and item[1] > 0)
        if not ok:
            raise ConfigError(f"optim.lr_multipliers entries are (pattern, multiplier > 0) pairs, got {item!r}; "
                              "freeze parameters with optim.freeze instead of a multiplier of 0")
    compile_patterns("optim.lr_multipliers", [p for p, _ in config.lr_multipliers])


def param_labels(config: ml_collections.ConfigDict, params: Any) -> Any:
    """Each parameter's group: :data:`FROZEN` (matches ``freeze``), ``group<i>`` (first ``lr_multipliers`` pattern
    it matches) or :data:`DEFAULT_GROUP`."""
    freeze = compile_patterns("optim.freeze", config.freeze)
    groups = compile_patterns("optim.lr_multipliers", [p for p, _ in config.lr_multipliers])

    def label(path, _) -> str:
        name = param_path(path)
        if any(p.fullmatch(name) for p in freeze):
            return FROZEN
        return next((f"group{i}" for i, p in enumerate(groups) if p.fullmatch(name)), DEFAULT_GROUP)

    return jax.tree_util.tree_map_with_path(label, params)


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
    final_lr_frac, weight_decay, decay (decoupled|coupled), momentum, nesterov, b1, b2, clip_norm (0 = off), freeze
    and lr_multipliers (parameter groups, see the module docstring)."""
    schedule = make_schedule(config, total_steps)
    wd = float(config.weight_decay)
    mode = config.decay
    if mode not in ("decoupled", "coupled"):
        raise ConfigError(f"unknown optim.decay {mode!r}; use decoupled or coupled")
    if config.name not in OPTIMIZERS:
        raise ConfigError(f"unknown optim.name {config.name!r}; use adamw or sgd")
    check_param_groups(config)

    def updates(multiplier: float) -> list[optax.GradientTransformation]:
        if config.name == "adamw":
            direction = optax.scale_by_adam(b1=config.b1, b2=config.b2)
        else:
            momentum = config.momentum
            direction = optax.trace(decay=momentum, nesterov=config.nesterov) if momentum else optax.identity()
        decay = optax.add_decayed_weights(wd, mask=decay_mask) if wd else optax.identity()
        lr = schedule if multiplier == 1 else (lambda count: multiplier * schedule(count))
        return [*([decay, direction] if mode == "coupled" else [direction, decay]), optax.scale_by_learning_rate(lr)]

    clip = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
    if not config.freeze and not config.lr_multipliers:
        return optax.chain(*clip, *updates(1.0))

    def labels(params: Any) -> Any:
        return param_labels(config, params)

    def frozen_mask(params: Any) -> Any:
        return jax.tree.map(lambda group: group == FROZEN, labels(params))

    groups = {DEFAULT_GROUP: optax.chain(*updates(1.0)), FROZEN: optax.set_to_zero(),
              **{f"group{i}": optax.chain(*updates(float(m))) for i, (_, m) in enumerate(config.lr_multipliers)}}
    # frozen gradients are zeroed first, so the global norm that clipping uses counts the trained parameters only
    return optax.chain(optax.masked(optax.set_to_zero(), frozen_mask), *clip, optax.multi_transform(groups, labels))
