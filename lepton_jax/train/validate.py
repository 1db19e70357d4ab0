"""Start-up validation of a training config: one clear ConfigError (one line, exit 2 from the CLI) before any lake
read, compilation or file write. Checks that need the devices (divisibility by the mesh) run in the loop right
after the mesh is built."""

from __future__ import annotations

import ml_collections

from lepton_jax.errors import ConfigError
from lepton_jax.parallel.edge import DELTA_DTYPES
from lepton_jax.parallel.mesh import MESH_AXES
from lepton_jax.parallel.rules import rules_from_config
from lepton_jax.robust.objectives import check_robust_config
from lepton_jax.tracking import check_tracking_config
from lepton_jax.train.init import check_init_config
from lepton_jax.train.optim import DECAYS, OPTIMIZERS, SCHEDULES, check_param_groups

EDGE_SPLITS = ("iid", "label")


def _positive(config: ml_collections.ConfigDict, *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        node = config
        for part in key.split("."):
            node = node[part]
        if not isinstance(node, int | float) or isinstance(node, bool) or node < 0 or (node == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{key} must be {bound}, got {node!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` for the first problem found in ``config``."""
    _positive(config, "num_epochs", "batch_size", "eval_batch_size", "log_every_steps", "grad_accum_steps",
              "optim.lr", "checkpoint.keep_latest")
    _positive(config, "eval_every_steps", "prefetch", "profile_steps", "profile_start_step", "optim.warmup_steps",
              "optim.weight_decay", "optim.clip_norm", "optim.momentum", "checkpoint.keep_best", allow_zero=True)
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
    if not 0 <= o.final_lr_frac <= 1 or not 0 <= o.b1 < 1 or not 0 <= o.b2 < 1 or o.momentum >= 1:
        raise ConfigError("optim: need 0 <= final_lr_frac <= 1, 0 <= b1, b2 < 1 and 0 <= momentum < 1")
    check_param_groups(o)
    check_init_config(config.init)
    check_robust_config(config.robust)
    check_tracking_config(config.tracking)
    e = config.edge
    _positive(config, "edge.nodes", "edge.sync_every", "edge.fragments", "edge.outer_lr")
    if e.split not in EDGE_SPLITS:
        raise ConfigError(f"unknown edge.split {e.split!r}; use {' or '.join(EDGE_SPLITS)}")
    if e.delta_dtype not in DELTA_DTYPES:
        raise ConfigError(f"unknown edge.delta_dtype {e.delta_dtype!r}; use one of {', '.join(DELTA_DTYPES)}")
    if not 0 <= e.skip_prob < 1:
        raise ConfigError(f"edge.skip_prob must be in [0, 1) (the probability a node misses a sync round), got "
                          f"{e.skip_prob}")
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
