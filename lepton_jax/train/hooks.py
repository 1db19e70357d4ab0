"""Hooks: work the loop runs every n steps (and, with ``at_end``, at the last step and on preemption).

``fn(ctx) -> dict | None``; a returned dict is logged at that step and merged into ``ctx.metrics`` (so the
checkpoint hook, which runs last, saves it with the checkpoint and best-by-metric sees it). Built in: dev evaluation,
the catastrophic-overfitting monitor, the profiler window and checkpointing; the end-of-run report is
:func:`report`. Add your own with ``Loop.add_hook(fn, every=n)`` or ``train(..., hooks=[Hook(fn, every=n)])``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from lepton_jax import tracking
from lepton_jax.checkpoint import Checkpointer
from lepton_jax.data import LakeDataSource
from lepton_jax.eval import metrics as eval_metrics
from lepton_jax.files import atomic_write

TRAIN_SECONDS = "train_seconds"  # summary.json and checkpoint metrics: see RunContext


@dataclasses.dataclass
class RunContext:
    """What hooks and the report see: the run, its checkpoints, the strategy, data and the live state."""

    config: Any
    run: tracking.RunDir
    ckpt: Checkpointer
    strategy: Any
    schema: dict[str, Any]
    sources: dict[str, LakeDataSource]
    batches: Any
    progress: bool
    state: Any = None
    step: int = 0
    epoch: int = 0
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # this step's hook metrics
    history: dict[str, list] = dataclasses.field(default_factory=lambda: {"step": [], "loss": [],
                                                                          "dev_accuracy": []})
    stop_reason: str | None = None  # a hook sets it to end training after this step
    data_version: int = 0
    loop_time: dict[str, float] = dataclasses.field(default_factory=dict)  # main-thread seconds by loop phase
    # Training seconds (``train_seconds`` in summary.json and in each checkpoint's metrics, ``elapsed_s`` at each
    # evaluation in metrics.jsonl): wall seconds in the training loop — steps (compilation included) and hooks (dev
    # evaluation, checkpoint saves) — summed over every session that trained the run. A resumed session adds its
    # own to the count saved with the checkpoint it restored (``prior_seconds``), so rerunning a finished run adds
    # nothing. Not counted: setup (lake, model init, restore), the final test evaluation and report, and time a
    # killed session spent after its last checkpoint (those steps are trained again, and counted, on resume).
    prior_seconds: float = 0.0
    loop_start: float | None = None  # perf_counter when this session's loop began
    saved_seconds: tuple[int, float] | None = None  # (step, training seconds) of the latest checkpoint

    def train_seconds(self) -> float:
        """Training seconds so far (see above)."""
        if self.loop_start is None:
            return self.prior_seconds
        return self.prior_seconds + time.perf_counter() - self.loop_start

    def say(self, message: str) -> None:
        if self.progress and jax.process_index() == 0:
            print(message, flush=True)


@dataclasses.dataclass
class Hook:
    fn: Callable[[RunContext], dict[str, Any] | None]
    every: int  # run after every `every`-th step (0: only at the end / on preemption when at_end)
    at_end: bool = True
    name: str = ""

    def due(self, step: int, last: bool) -> bool:
        return (self.every > 0 and step % self.every == 0) or (last and self.at_end)


def evaluate(ctx: RunContext, params: Any, split: str = "dev") -> dict[str, float]:
    s = ctx.strategy
    out = eval_metrics.evaluate_split(s.predict, params, ctx.sources[split], schema=ctx.schema,
                                      global_batch_size=s.eval_batch, sharding=s.eval_sharding)
    return s.built.task.metrics(out["logits"], out["labels"])


def dev_eval_hook(every: int) -> Hook:
    def fn(ctx: RunContext) -> dict[str, Any]:
        dev = evaluate(ctx, ctx.strategy.eval_params(ctx.state))
        if "accuracy" in dev:
            ctx.history["dev_accuracy"].append(dev["accuracy"])
        loss = ctx.history["loss"][-1] if ctx.history["loss"] else float("nan")
        shown = ["loss", *(k for k in dev if k != "loss")][:4]  # the loss and the task's first metrics
        ctx.say(f"step {ctx.step} (epoch {ctx.epoch}): train loss {loss:.4f}  "
                + "  ".join(f"dev {k} {dev[k]:.4f}" for k in shown))
        return {**{f"dev_{k}": v for k, v in dev.items()}, "elapsed_s": ctx.train_seconds()}

    return Hook(fn, every, name="dev_eval")


def monitor_hook(monitor: Callable[[Any], dict[str, Any]], every: int) -> Hook:
    """The catastrophic-overfitting monitor (:mod:`lepton_jax.robust.monitor`); a flagged step is never best, and
    with ``robust.monitor_early_stop`` training stops."""

    def fn(ctx: RunContext) -> dict[str, Any]:
        co = monitor(ctx.strategy.eval_params(ctx.state))
        if co["co_flagged"]:
            ctx.say(f"step {ctx.step}: catastrophic overfitting suspected: dev FGSM accuracy "
                    f"{co['co_fgsm_accuracy']:.3f}, PGD accuracy {co['co_pgd_accuracy']:.3f}"
                    + ("; stopping (robust.monitor_early_stop)" if co["co_stop"] else ""))
        if co["co_stop"]:
            ctx.stop_reason = "catastrophic_overfitting"
        return co

    return Hook(fn, every, name="co_monitor")


def checkpoint_hook(every: int) -> Hook:
    """Saves the state with this step's hook metrics (asynchronously: off the critical path)."""

    def fn(ctx: RunContext) -> None:
        save(ctx)

    return Hook(fn, every, name="checkpoint")


def save(ctx: RunContext) -> None:
    """Checkpoints the state with this step's hook metrics and the training seconds that produced it."""
    seconds = ctx.train_seconds()
    ctx.run.flush()  # the events up to this step reach disk before the checkpoint a resume would start from
    metrics = {**{k: v for k, v in ctx.metrics.items() if isinstance(v, int | float | bool)},
               TRAIN_SECONDS: seconds}
    if ctx.ckpt.save(ctx.step, ctx.strategy.items(ctx.state), metrics, data_state=ctx.batches.get_state()):
        ctx.saved_seconds = (ctx.step, seconds)


def profiler_hook(directory: Path, start_step: int, steps: int) -> Hook | None:
    """Traces steps ``start_step .. start_step + steps - 1`` into ``directory`` (TensorBoard/Perfetto)."""
    if steps <= 0 or jax.process_index() != 0:
        return None
    first, last = max(0, start_step - 1), start_step + steps - 1

    def fn(ctx: RunContext) -> None:
        if ctx.step == first:
            jax.block_until_ready(ctx.state)
            jax.profiler.start_trace(str(directory))
        elif ctx.step == last:
            jax.block_until_ready(ctx.state)
            jax.profiler.stop_trace()

    return Hook(fn, 1, at_end=False, name="profiler")


def final_seconds(ctx: RunContext) -> float:
    """The training seconds of the final state: those saved with its checkpoint when there is one (so a rerun of a
    finished run reports what the run that trained it saved), else the count so far."""
    if ctx.saved_seconds is not None and ctx.saved_seconds[0] == ctx.step:
        return ctx.saved_seconds[1]
    return ctx.train_seconds()


def report(ctx: RunContext, extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """The end of a run: restores the best checkpoint (by ``checkpoint.best_metric``; the latest when none is
    eligible), evaluates it on the test split, writes report.txt/json, confusion_matrix.png and summary.json, and
    closes the run and checkpointer. Returns ``(summary, best_params, report)``."""
    ckpt, run = ctx.ckpt, ctx.run
    ckpt.wait()
    best_step = ckpt.best_step() or ckpt.latest_step()
    best_params = ckpt.restore_params(ctx.strategy.built.abstract_params, best_step)
    ckpt.close()
    label_names = list(ctx.schema["label_names"])
    s = ctx.strategy
    task = s.built.task
    outputs = eval_metrics.evaluate_split(s.predict, best_params, ctx.sources["test"], schema=ctx.schema,
                                          global_batch_size=s.eval_batch, sharding=s.eval_sharding,
                                          progress=ctx.progress)
    result = task.report(outputs["logits"], outputs["labels"])
    logged = tracking.read_metrics(run.path)
    if "confusion_matrix" in result:  # classification
        best = {"best_dev_accuracy": max([r["dev_accuracy"] for r in logged if r.get("dev_accuracy") is not None]
                                         + ctx.history["dev_accuracy"], default=None)}
    else:
        metric, pick = ctx.config.checkpoint.best_metric, max if ctx.config.checkpoint.best_mode == "max" else min
        best = {f"best_{metric}": pick([r[metric] for r in logged if r.get(metric) is not None], default=None)}
    summary = {**result["summary"], "best_step": best_step, "best_metric": ctx.config.checkpoint.best_metric, **best,
               TRAIN_SECONDS: final_seconds(ctx), "steps": ctx.step,
               "data_version": ctx.data_version, **(extra or {})}
    if run.is_writer:  # each file atomically, summary.json last: a run stopped in between reports again on a rerun
        out = run.path
        with atomic_write(out / "report.txt") as f:
            f.write(result["text"])
        tracking.write_json_atomic(out / "report.json", result["json"])
        if "confusion_matrix" in result:
            eval_metrics.save_confusion_matrix(result["confusion_matrix"], label_names, out / "confusion_matrix.png",
                                               title=f"test split, step {best_step}: accuracy "
                                                     f"{result['accuracy']:.4f}")
        tracking.write_json_atomic(out / "summary.json", summary)
    run.log(**summary)
    if run.is_writer:
        run.update_run_info(finished=True, summary=summary)
        run.log_final(ctx.step, summary, image=out / "confusion_matrix.png")  # TensorBoard / W&B
    run.close()
    return summary, best_params, result
