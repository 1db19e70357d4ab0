"""Catastrophic-overfitting monitor for single-step adversarial training (Wong et al. 2020, §5).

Single-step training (FGSM, FGSM-RS, free) can suddenly learn to defeat its own single-step attack while PGD
accuracy collapses to ~0. Each epoch the monitor attacks a fixed held-out batch with FGSM and with PGD and flags
catastrophic overfitting when FGSM accuracy exceeds PGD accuracy by more than ``gap``, or when PGD accuracy falls
more than ``drop`` below its best epoch so far. The attacks are pure and jitted; the monitor only keeps the
history of PGD accuracies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from lepton_jax.robust.evaluate import AttackSpec, attack_correct


class OverfittingMonitor:
    def __init__(self, apply: Callable, x: np.ndarray, y: np.ndarray, *, epsilon: float, norm: str = "linf",
                 box: tuple[float, float] | None = (0.0, 1.0), pgd_steps: int = 10, gap: float = 0.2,
                 drop: float = 0.2, early_stop: bool = False, seed: int = 0,
                 sharding: NamedSharding | None = None, batch_size: int = 256):
        self.apply, self.x, self.y = apply, x, y
        self.kw = dict(epsilon=epsilon, norm=norm, box=box, sharding=sharding, batch_size=batch_size)
        self.fgsm = AttackSpec("fgsm", kind="fgsm")
        self.pgd = AttackSpec(f"pgd{pgd_steps}", steps=pgd_steps, step_size=2.5 / pgd_steps)
        self.gap, self.drop, self.early_stop = gap, drop, early_stop
        self.flags = True  # False: only measure (dev PGD accuracy for checkpoint selection), never flag
        self.key = jax.random.PRNGKey(seed)
        self.history: list[float] = []

    def __call__(self, params: Any) -> dict[str, float | bool]:
        """Attacks the held-out batch; returns ``co_fgsm_accuracy``, ``co_pgd_accuracy``, ``co_gap``,
        ``co_drop``, ``co_flagged`` and ``co_stop`` (flagged and early stop enabled), for the metrics log."""
        fgsm = float(attack_correct(self.apply, params, self.x, self.y, self.fgsm, key=self.key, **self.kw).mean())
        pgd = float(attack_correct(self.apply, params, self.x, self.y, self.pgd, key=self.key, **self.kw).mean())
        best = max(self.history, default=pgd)
        self.history.append(pgd)
        gap, drop = fgsm - pgd, best - pgd
        flagged = gap > self.gap or drop > self.drop
        return {"co_fgsm_accuracy": fgsm, "co_pgd_accuracy": pgd, "dev_pgd_accuracy": pgd, "co_gap": gap,
                "co_drop": drop, "co_flagged": bool(flagged and self.flags),
                "co_stop": bool(flagged and self.flags and self.early_stop)}


def make_overfitting_monitor(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, source, schema: dict,
                             sharding: NamedSharding | None = None) -> OverfittingMonitor | None:
    """The monitor a config asks for: flagging catastrophic overfitting when ``config.robust`` selects a
    single-step objective with ``monitor`` on; measuring only (``dev_pgd_accuracy``) when the objective is
    adversarial or ``checkpoint.best_metric`` is ``dev_pgd_accuracy``; otherwise ``None``. ``source`` is a
    held-out split (the loop's dev source); its first ``monitor_examples`` examples form the batch."""
    from lepton_jax.data.transforms import INPUT, LABEL, prepare_batch
    from lepton_jax.models.functional import make_apply
    from lepton_jax.robust.objectives import SINGLE_STEP

    rc = config.robust
    flags = rc.objective in SINGLE_STEP and rc.monitor
    if not flags and rc.objective == "standard" and config.checkpoint.best_metric != "dev_pgd_accuracy":
        return None
    n = min(len(source), int(rc.monitor_examples))
    batch = prepare_batch(source.__getitems__(np.arange(n)), schema)
    monitor = OverfittingMonitor(make_apply(graphdef), batch[INPUT], batch[LABEL], epsilon=rc.epsilon,
                                 norm=rc.norm, gap=rc.monitor_gap, drop=rc.monitor_drop,
                                 early_stop=rc.monitor_early_stop, seed=int(config.seed), sharding=sharding)
    monitor.flags = bool(flags)
    return monitor
