"""Start-up validation of a training config: one clear ConfigError (one line, exit 2 from the CLI) before any lake
read, compilation or file write. Checks that need the devices (divisibility by the mesh) run in the loop right
after the mesh is built."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import ml_collections

from lepton_jax.data.augment import parse_augment
from lepton_jax.errors import ConfigError
from lepton_jax.parallel.edge import DELTA_DTYPES
from lepton_jax.parallel.mesh import MESH_AXES
from lepton_jax.parallel.rules import rules_from_config
from lepton_jax.robust.objectives import check_robust_config
from lepton_jax.tracking import check_tracking_config
from lepton_jax.train.init import check_init_config
from lepton_jax.train.optim import DECAYS, OPTIMIZERS, SCHEDULES, check_param_groups

EDGE_SPLITS = ("iid", "label")


@dataclasses.dataclass(frozen=True)
class Range:
    """What a numeric config key may hold: ``text`` completes "KEY must be ...", ``ok`` tests a value, and ``bad``
    lists values just outside it (for the table-driven tests)."""

    text: str
    ok: Callable[[Any], bool]
    bad: tuple[Any, ...]


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


POSITIVE = Range("> 0", lambda v: _number(v) and v > 0, (0, -1e-3, math.inf, math.nan))
NON_NEGATIVE = Range(">= 0", lambda v: _number(v) and v >= 0, (-1e-3, math.inf, math.nan))
POSITIVE_INT = Range("> 0", lambda v: _integer(v) and v > 0, (0, -5))
NON_NEGATIVE_INT = Range(">= 0", lambda v: _integer(v) and v >= 0, (-1,))
PROBABILITY = Range("in [0, 1)", lambda v: _number(v) and 0 <= v < 1, (-0.1, 1.0, 1.5, math.nan))
FRACTION = Range("in [0, 1]", lambda v: _number(v) and 0 <= v <= 1, (-0.1, 1.5, math.nan))
FINITE = Range("finite", _number, (math.inf, -math.inf, math.nan))
ALL_OR_POSITIVE_INT = Range("-1 (all) or > 0", lambda v: _integer(v) and (v == -1 or v > 0), (0, -5))
POSITIVE_INTS = Range("a sequence of integers > 0 (or one)", lambda v: POSITIVE_INT.ok(v) or (
    isinstance(v, tuple | list) and all(POSITIVE_INT.ok(x) for x in v)), (0, -3, (0, 64), (32, -1)))

# Every numeric key of the base config and the range it must hold, checked before anything is read or written.
# A new section's keys are one line each; tests/test_config.py fails on a numeric base-config key missing here.
NUMERIC_KEYS: dict[str, Range] = {
    "seed": NON_NEGATIVE_INT, "num_epochs": POSITIVE_INT, "batch_size": POSITIVE_INT,
    "eval_batch_size": POSITIVE_INT, "log_every_steps": POSITIVE_INT, "eval_every_steps": NON_NEGATIVE_INT,
    "grad_accum_steps": POSITIVE_INT, "prefetch": NON_NEGATIVE_INT, "data.version": NON_NEGATIVE_INT,
    "profile_start_step": NON_NEGATIVE_INT, "profile_steps": NON_NEGATIVE_INT,
    "optim.lr": POSITIVE, "optim.warmup_steps": NON_NEGATIVE_INT, "optim.final_lr_frac": FRACTION,
    "optim.weight_decay": NON_NEGATIVE, "optim.clip_norm": NON_NEGATIVE, "optim.b1": PROBABILITY,
    "optim.b2": PROBABILITY, "optim.momentum": PROBABILITY,
    "mesh.num_devices": ALL_OR_POSITIVE_INT, "sharding.min_size": NON_NEGATIVE_INT,
    "checkpoint.keep_latest": POSITIVE_INT, "checkpoint.keep_best": NON_NEGATIVE_INT,
    "edge.nodes": POSITIVE_INT, "edge.sync_every": POSITIVE_INT, "edge.outer_lr": POSITIVE,
    "edge.outer_momentum": PROBABILITY, "edge.fragments": POSITIVE_INT, "edge.skip_prob": PROBABILITY,
    "robust.epsilon": NON_NEGATIVE, "robust.step_size": POSITIVE, "robust.steps": POSITIVE_INT,
    "robust.fgsm_clean_weight": FRACTION, "robust.fgsm_rs_step": POSITIVE, "robust.free_replays": POSITIVE_INT,
    "robust.free_step": POSITIVE, "robust.trades_beta": NON_NEGATIVE, "robust.eval_steps": POSITIVE_INT,
    "robust.eval_restarts": POSITIVE_INT, "robust.monitor_examples": POSITIVE_INT, "robust.monitor_gap": FINITE,
    "robust.monitor_drop": FINITE,
}
# The model section is the model's own keyword arguments; these are the built-in models' numeric ones (a key the
# chosen model does not take is absent from its config and skipped; a plug-in model validates its own).
MODEL_KEYS: dict[str, Range] = {
    "features": POSITIVE_INTS, "hidden": POSITIVE_INTS, "widths": POSITIVE_INTS, "dropout": PROBABILITY,
    "kernel_size": POSITIVE_INT, "patch": POSITIVE_INT, "width": POSITIVE_INT, "depth": POSITIVE_INT,
    "num_heads": POSITIVE_INT, "mlp_dim": POSITIVE_INT, "blocks_per_stage": POSITIVE_INT, "groups": POSITIVE_INT,
}


def check_ranges(config: ml_collections.ConfigDict) -> None:
    """One-line :class:`ConfigError` naming the first key of :data:`NUMERIC_KEYS` / :data:`MODEL_KEYS` out of range."""
    checks = [(key, rule) for key, rule in NUMERIC_KEYS.items()]
    checks += [(f"model.{key}", rule) for key, rule in MODEL_KEYS.items() if key in config.model]
    for key, rule in checks:
        node = config
        for part in key.split("."):
            node = node[part]
        if not rule.ok(node):
            raise ConfigError(f"{key} must be {rule.text}, got {node!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` for the first problem found in ``config``."""
    check_ranges(config)
    if config.batch_size % config.grad_accum_steps:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by grad_accum_steps "
                          f"{config.grad_accum_steps}")
    axes = dict(config.mesh.axes)
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh.axes names {unknown}; axis names are {', '.join(MESH_AXES)} (a typo would "
                          "silently disable data parallelism)")
    if not axes:
        raise ConfigError("mesh.axes is empty; use e.g. {'data': -1}")
    bad = {k: v for k, v in axes.items() if not isinstance(v, int) or v == 0 or v < -1}
    if bad or sum(v == -1 for v in axes.values()) > 1:
        raise ConfigError(f"mesh.axes {axes}: sizes must be positive integers, with at most one -1")
    unknown = sorted(set(dict(config.mesh.dcn_axes)) - set(axes))
    if unknown:
        raise ConfigError(f"mesh.dcn_axes names {unknown}, which mesh.axes does not have")
    rules_from_config(config.sharding)
    o = config.optim
    for key, value, allowed in (("optim.name", o.name, OPTIMIZERS), ("optim.schedule", o.schedule, SCHEDULES),
                                ("optim.decay", o.decay, DECAYS), ("checkpoint.best_mode", config.checkpoint.best_mode,
                                                                   ("max", "min"))):
        if value not in allowed:
            raise ConfigError(f"unknown {key} {value!r}; use one of {', '.join(allowed)}")
    check_param_groups(o)
    check_init_config(config.init)
    check_robust_config(config.robust)
    check_tracking_config(config.tracking)
    parse_augment(config.augment)
    e = config.edge
    if e.split not in EDGE_SPLITS:
        raise ConfigError(f"unknown edge.split {e.split!r}; use {' or '.join(EDGE_SPLITS)}")
    if e.delta_dtype not in DELTA_DTYPES:
        raise ConfigError(f"unknown edge.delta_dtype {e.delta_dtype!r}; use one of {', '.join(DELTA_DTYPES)}")
    if e.nodes > 1:
        if config.batch_size % e.nodes:
            raise ConfigError(f"batch_size {config.batch_size} is not divisible by edge.nodes={e.nodes}")
        if config.robust.objective != "standard":
            raise ConfigError(f"edge training (edge.nodes={e.nodes}) runs the standard objective only; got "
                              f"robust.objective={config.robust.objective!r}")
        if config.grad_accum_steps != 1:
            raise ConfigError("edge training takes one local step per batch; set grad_accum_steps=1")
        if config.sharding.rules not in ("dp", ()):
            raise ConfigError("edge training keeps a full replica per node; set sharding.rules='dp'")
    if config.robust.objective != "standard" and config.grad_accum_steps != 1:
        raise ConfigError(f"robust.objective {config.robust.objective!r} does not support grad_accum_steps="
                          f"{config.grad_accum_steps} (its attack and update run on the whole batch); set "
                          "grad_accum_steps=1 or lower batch_size")
