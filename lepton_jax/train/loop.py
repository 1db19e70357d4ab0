"""The training loop: one loop for every strategy (synchronous data parallel with any objective, edge local SGD /
DiLoCo), with hooks for evaluation, monitors, profiling and checkpointing.

``train(config, workdir)`` is the library entry point (the CLI, sweeps and notebooks all call it): it validates the
config, opens the lake table, picks the strategy (:func:`lepton_jax.train.choose.make_strategy`) and runs
:class:`Loop`. The loop owns resume, logging, NaN/inf handling, hooks, preemption and the final report, once.
A workdir holds one experiment: rerunning with the same workdir and config resumes from the latest checkpoint
(every state item, the rng, the step and the Grain iterator position), so a resumed run produces the same
parameters and metrics as an uninterrupted one. SIGTERM (preemption) or SIGINT (Ctrl-C) during training ends the
run after the current step with that step saved (evaluating first only if an evaluation was due there) and a clean
return (``signal`` names it); with several processes all agree on the step. Before and after the loop (start-up,
restore, the final report) the CLI's :func:`lepton_jax.signals.raise_on_signals` ends the run with
:class:`lepton_jax.signals.Interrupted` (``saved_step`` set during the report, which a rerun writes).

Off the critical path: input batches are prepared and placed on devices in a background thread
(:mod:`lepton_jax.train.prefetch`), logged metrics are copied to the host asynchronously and read one step later
(with the next step queued), their rows are written (JSON line, TensorBoard, W&B, the learning rate, which is a
device computation queued behind the running steps) by a writer thread, and a checkpoint costs the loop a device copy
of the state (in one process; :mod:`lepton_jax.checkpoint`): Orbax saves it from a background thread.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from lepton_jax import tracking
from lepton_jax.checkpoint import from_config
from lepton_jax.data import LakeDataSource
from lepton_jax.data import augment as augment_lib
from lepton_jax.errors import ConfigError, TrainingDivergedError
from lepton_jax.lake import Lake
from lepton_jax.signals import Interrupted
from lepton_jax.tasks import run_schema
from lepton_jax.train import init as init_lib
from lepton_jax.train import perf
from lepton_jax.train.choose import make_strategy
from lepton_jax.train.hooks import (
    TRAIN_SECONDS,
    Hook,
    RunContext,
    checkpoint_hook,
    dev_eval_hook,
    evaluate,
    monitor_hook,
    profiler_hook,
    report,
    save,
)
from lepton_jax.train.prefetch import Prefetcher
from lepton_jax.train.strategy import Strategy
from lepton_jax.train.validate import validate_config

__all__ = ["Hook", "Loop", "Preemption", "RunContext", "train", "train_and_evaluate"]


class Preemption:
    """SIGTERM (and SIGINT: Ctrl-C) as a flag the loop reads once per step (:meth:`check`); ``signal`` names the one
    that came.

    One process: a Python handler sets the flag (only where signals can be handled). Several processes:
    JAX's preemption sync service (``multihost_utils.reached_preemption_sync_point``, on by default with
    ``jax.distributed``) takes the signal on whichever process gets it, agrees in the background on the first step
    every process can still reach, and :meth:`check` turns true on all processes at that same step, with no
    per-step collective. Without that service, a per-step all-gather of the local flag agrees instead."""

    def __init__(self):
        self.requested, self.signal = False, None
        self._previous: dict = {}
        self._sync = jax.process_count() > 1 and _preemption_service()
        self.agreement = ("JAX preemption sync" if self._sync else
                          "all-gathered flag" if jax.process_count() > 1 else "one process")

    def __enter__(self) -> Preemption:
        if not self._sync and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame) -> None:
        self.requested, self.signal = True, self.signal or signal.Signals(signum).name

    def check(self, step: int) -> bool:
        if self._sync:
            return multihost_utils.reached_preemption_sync_point(step)
        flag = self.requested
        if jax.process_count() > 1:
            flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
        return flag

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _preemption_service() -> bool:
    from jax._src import distributed  # the only handle on whether the service runs (no public accessor)

    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


def _summary_at(path: Path, step: int | None) -> dict[str, Any]:
    """The summary (or run.json) at ``path`` if it describes a run that ended at ``step`` (None: any), else {}."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) and (step is None or summary.get("steps") == step) else {}


def _summary_seconds(path: Path, step: int) -> float | None:
    """``train_seconds`` of the summary at ``path`` if it describes a run that ended at ``step``, else None."""
    seconds = _summary_at(path, step).get(TRAIN_SECONDS)
    return float(seconds) if isinstance(seconds, int | float) else None


LOG_WINDOW = "log_window"  # checkpoint-metrics prefix of the steps logged since the last row (a SIGTERM stop)


def _window_metrics(window: list[dict[str, float]]) -> dict[str, float]:
    """The host metrics of the steps since the last logged row, flattened into checkpoint metrics."""
    return {f"{LOG_WINDOW}.{i}.{k}": v for i, m in enumerate(window) for k, v in m.items()}


def _window_from(metrics: dict[str, Any] | None) -> list[dict[str, float]]:
    """The inverse of :func:`_window_metrics` (empty when the checkpoint holds no window)."""
    window: dict[int, dict[str, float]] = {}
    for key, value in (metrics or {}).items():
        if key.startswith(f"{LOG_WINDOW}."):
            _, index, name = key.split(".", 2)
            window.setdefault(int(index), {})[name] = value
    return [window[i] for i in sorted(window)]


class Loop:
    """One run of a strategy in a workdir; add hooks before :meth:`run`."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path, strategy: Strategy, *,
                 schema: dict[str, Any], sources: dict[str, LakeDataSource], data_info: dict[str, Any],
                 progress: bool = True, stop_after_step: int | None = None, parent: init_lib.Parent | None = None):
        self.config, self.workdir, self.strategy = config, Path(workdir), strategy
        self.parent = parent  # where a fresh run's parameters start (None: random), see lepton_jax.train.init
        abstract = strategy.built.abstract_params
        self.reinit = init_lib.reinitialized(config, parent, abstract) if parent else []
        self.lineage = init_lib.lineage(parent, data_info, self.reinit, init_lib.frozen_leaves(config, abstract))
        self.schema, self.sources, self.data_info = schema, sources, data_info
        self.progress, self.stop_after_step = progress, stop_after_step
        self.eval_every = config.eval_every_steps or strategy.steps_per_epoch
        self._user_hooks: list[Hook] = []

    def add_hook(self, fn: Any, every: int = 1, *, at_end: bool = False, name: str = "") -> Hook:
        """Runs ``fn(ctx) -> dict | None`` after every ``every``-th step (before the checkpoint of that step, so
        the metrics it returns are saved with it); ``at_end`` also runs it after the last step."""
        hook = fn if isinstance(fn, Hook) else Hook(fn, every, at_end=at_end, name=name or getattr(fn, "__name__", ""))
        self._user_hooks.append(hook)
        return hook

    def _hooks(self, run: tracking.RunDir) -> list[Hook]:
        from lepton_jax.robust.monitor import make_overfitting_monitor

        s, every = self.strategy, self.eval_every
        hooks = [profiler_hook(run.path / "profile", self.config.profile_start_step, self.config.profile_steps),
                 dev_eval_hook(every)]
        monitor = make_overfitting_monitor(self.config, s.built.graphdef, self.sources["dev"], self.schema,
                                           s.eval_sharding)
        if monitor is not None:
            hooks.append(monitor_hook(monitor, every))
        return [h for h in hooks if h is not None] + self._user_hooks + [checkpoint_hook(every)]

    def run(self) -> dict[str, Any]:
        config, s = self.config, self.strategy
        run = tracking.RunDir(self.workdir)
        run.check_same_config(config)
        earlier = _summary_at(run.path / tracking.RUN_FILE, None).get("lineage")  # before start() rewrites run.json
        run.start(config, extra={"data": self.data_info, "seed": config.seed, "mesh": dict(s.mesh.shape),
                                 "strategy": s.name, "num_params": s.built.num_params, "lineage": self.lineage,
                                 "augment": augment_lib.describe(config.augment),
                                 **s.run_info()})
        ckpt = from_config(run.checkpoint_dir, config.checkpoint)
        batches = Prefetcher(s.batches(self.sources["train"], self.schema), s.data_sharding, config.prefetch)
        ctx = RunContext(config=config, run=run, ckpt=ckpt, strategy=s, schema=self.schema, sources=self.sources,
                         batches=batches, progress=self.progress, data_version=self.data_info["version"])
        ctx.say(f"lake {self.data_info['lake']} table {self.data_info['table']} v{self.data_info['version']}: "
                + ", ".join(f"{k} {len(v)}" for k, v in self.sources.items()) + " examples")
        ctx.say(f"model {config.model.name}: {s.built.num_params:,} parameters; strategy {s.name}; "
                f"{s.total_steps} steps of batch {config.batch_size}; {s.describe()}")
        start_step, carried = 0, []
        if ckpt.latest_step() is None:
            if (run.path / tracking.METRICS_FILE).exists():
                run.truncate_metrics(after_step=0)  # rows a run killed before its first checkpoint logged
            state = s.init_state(self._initial_params(ctx))
        else:  # same workdir, same config: continue where the last run stopped
            if earlier and earlier != self.lineage:  # its parent, even if the reference now names another version
                self.lineage = earlier
                run.update_run_info(lineage=earlier)
            items, data_state = ckpt.restore(s.abstract_items())
            state = s.from_items(items)
            batches.set_state(data_state)
            start_step = int(jax.device_get(state.step))
            run.truncate_metrics(after_step=start_step)  # lines a killed run logged after its last checkpoint
            run.log(step=start_step, resumed_from_step=start_step)
            carried = _window_from(ckpt.metrics(start_step))  # steps a SIGTERM stop saved but had not logged
            seconds = (ckpt.metrics(start_step) or {}).get(TRAIN_SECONDS)
            if seconds is None:  # a checkpoint from before the count was saved: a finished run's summary has it
                seconds = _summary_seconds(run.path / "summary.json", start_step)
            if seconds is not None:  # training seconds of the earlier sessions (see RunContext)
                ctx.prior_seconds, ctx.saved_seconds = float(seconds), (start_step, float(seconds))
            ctx.say(f"resuming from checkpoint step {start_step} in {run.checkpoint_dir}")
        # a run a hook stopped early (e.g. catastrophic overfitting) ended there: a rerun reports, it does not train on
        stopped = _summary_at(run.path / "summary.json", start_step).get("stopped_early") if start_step else None
        hooks = self._hooks(run)
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lepton-log")  # one thread: rows in order
        try:
            return self._loop(ctx, state, start_step, hooks, writer, stopped, carried)
        finally:
            writer.shutdown()  # the rows handed to it are written before the run closes
            batches.close()
            run.close()  # flushes TensorBoard and finishes W&B even when the run fails (no-op after the report)

    def _loop(self, ctx: RunContext, state: Any, start_step: int, hooks: list[Hook], writer: ThreadPoolExecutor,
              stopped: str | None = None, carried: list[dict[str, float]] = ()) -> dict[str, Any]:
        """Rows of train metrics end at steps fixed by the global step alone (multiples of ``log_every_steps`` and of
        the evaluation interval, the last step), so a resumed run logs the rows and values of an uninterrupted one:
        a SIGTERM stop between rows saves the steps since the last row with its checkpoint (``carried`` on resume);
        a hook's early stop ends the run and logs them as its last row.

        The main thread reads each row's metrics (the history and the divergence check stay on it, at a step fixed by
        the grid) and hands the row to ``writer``; every step that must see its rows on disk (hooks, the last step,
        a preemption, a divergence) first waits for the writer, so ``metrics.jsonl`` holds the same lines in the same
        order as a synchronous loop writes, and hooks find the run as they did."""
        config, s, run = self.config, self.strategy, ctx.run
        carried = list(carried)
        log_every = config.log_every_steps
        pending: list = []  # device metrics of steps not yet sent to the host
        in_flight: list[tuple[int, Any]] = []  # (last step, Strategy.copy_metrics of its window) on their way
        written: list[Future] = []  # rows handed to the writer thread, oldest first
        flops = None
        last_log = time.perf_counter()
        ctx.step, ctx.state = start_step, state
        ctx.loop_start = time.perf_counter()
        clock = ctx.loop_time  # wall seconds of the loop's main thread by phase (run.json: loop_time_s)
        tick = time.perf_counter

        def spent(phase: str, since: float) -> float:
            now = tick()
            clock[phase] = clock.get(phase, 0.0) + now - since
            return now

        def drain(wait: bool = True) -> None:
            """Collects the writer's finished rows (``wait``: all of them), re-raising what failed there."""
            while written and (wait or written[0].done()):
                written.pop(0).result()

        def write_row(end: int, count: int, mean: dict[str, float], extra: dict[str, Any]) -> None:
            lr = float(s.schedule((end - 1) * s.updates_per_step))  # waits for the steps queued before it
            epoch = (end - 1) // s.steps_per_epoch + 1
            run.log(step=end, epoch=epoch, lr=lr, **{f"train_{k}": v for k, v in mean.items()}, **extra)
            bar.set_postfix(epoch=epoch, loss=f"{mean['loss']:.4f}")
            bar.update(count)

        def flush(upto: int) -> None:
            nonlocal last_log
            drain(wait=False)
            while in_flight and in_flight[0][0] <= upto:
                end, window = in_flight.pop(0)
                fetched = s.fetch_metrics(window)
                if carried:
                    fetched, carried[:] = carried + fetched, []
                now = time.perf_counter()
                step_time, last_log = (now - last_log) / len(fetched), now
                losses = [m["loss"] for m in fetched]
                ctx.history["step"] += list(range(end - len(fetched) + 1, end + 1))
                ctx.history["loss"] += losses
                mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                timing = {"step_time_s": step_time, "examples_per_s": config.batch_size / step_time}
                utilisation = perf.mfu(flops, 1.0 / step_time)
                if utilisation is not None:
                    timing["mfu"] = utilisation
                written.append(writer.submit(write_row, end, len(fetched), mean, {**s.step_info(end), **timing}))
                if not all(np.isfinite(losses)):
                    drain()
                    self._diverged(ctx)

        with Preemption() as preemption, tqdm(total=s.total_steps, initial=start_step, desc="train", unit="step",
                                               disable=not self.progress or jax.process_index() != 0) as bar:
            for step in range(start_step + 1, s.total_steps + 1 if stopped is None else start_step + 1):
                t = tick()
                batch = next(ctx.batches)
                t = spent("input_wait", t)
                if flops is None and perf.peak_flops() is not None:  # MFU only where the device peak is known
                    flops = s.flops(state, batch)
                state, step_metrics = s.step(state, batch)
                state = s.after_step(state, step)
                t = spent("step_dispatch", t)
                ctx.state, ctx.step, ctx.epoch = state, step, (step - 1) // s.steps_per_epoch + 1
                pending.append(step_metrics)
                preempted = preemption.check(step) or step == self.stop_after_step  # read once per step
                t = spent("preemption_check", t)
                last = step == s.total_steps
                due = [h for h in hooks if h.due(step, last)]
                row = last or step % log_every == 0 or step % self.eval_every == 0  # the global step's grid
                # a row is read (and logged) one step later, with the next step queued behind it, unless this step
                # must see it: the last, a preemption, or a hook (evaluations log after their row, saves keep it)
                sync = last or preempted or any(h.name != "profiler" for h in due)
                if row:
                    in_flight.append((step, s.copy_metrics(pending)))
                    pending = []
                flush(step if sync else step - 1)  # without a sync point, read the previous window only
                if sync:
                    drain()  # this step's rows are on disk before its hooks, its save or the end
                t = spent("metrics_fetch_and_log", t)
                ctx.metrics = {}
                for hook in due:
                    out = hook.fn(ctx)
                    if out:
                        ctx.metrics.update(out)
                        run.log(step=step, epoch=ctx.epoch, **out)
                    t = spent(f"hook:{hook.name}", t)
                if preempted:
                    if pending or carried:  # the steps since the last row go with the checkpoint, not into a row
                        window = s.fetch_metrics(s.copy_metrics(pending)) if pending else []
                        ctx.metrics.update(_window_metrics(carried + window))
                    save(ctx)  # no-op when the checkpoint hook already saved this step
                    ctx.ckpt.close()
                    run.log(step=step, preempted=True)
                    run.close()
                    name = preemption.signal or "SIGTERM"
                    ctx.say(f"{name}: saved checkpoint at step {step}; rerun the same command to resume")
                    print(f"lepton_jax: preempted at step {step} (process {jax.process_index()} of "
                          f"{jax.process_count()}; {preemption.agreement})", file=sys.stderr, flush=True)
                    return {"preempted": True, "signal": name, "steps": step, "history": ctx.history,
                            "final_state": state, "strategy": s, **s.summary_extra()}
                if ctx.stop_reason:
                    stopped = ctx.stop_reason
                    if pending:  # the run ends here: its last row
                        in_flight.append((step, s.copy_metrics(pending)))
                        pending = []
                        flush(step)
                        drain()
                    save(ctx)  # the step it stopped at (no-op when the checkpoint hook saved it): a rerun starts there
                    break
            ctx.ckpt.wait()  # the last step's async save is on disk while a SIGTERM is still only this flag
        try:  # the training is saved: a signal from here on ends the run there, and a rerun writes the report
            loop_time = {k: round(v, 4) for k, v in clock.items()}
            run.update_run_info(loop_time_s=loop_time)
            extra = {"lineage": self.lineage, **s.summary_extra(for_summary=True)}
            summary, best_params, result = report(ctx, extra={"stopped_early": stopped, **extra} if stopped
                                                  else extra)
        except Interrupted as e:
            e.saved_step = ctx.step
            raise
        kind = "classification" if "confusion_matrix" in result else s.built.task.name
        ctx.say(f"\ntest {kind} report (checkpoint step {summary['best_step']}, best "
                f"{config.checkpoint.best_metric}):\n{result['text']}")
        ctx.say(f"{result['headline']}\nwrote {self.workdir}/: config.json run.json metrics.jsonl report.txt "
                f"report.json {'confusion_matrix.png ' if 'confusion_matrix' in result else ''}summary.json "
                "checkpoints/")
        return {**summary, "history": ctx.history, "params": best_params, "final_state": state, "report": result,
                "strategy": s, "loop_time_s": loop_time, **s.summary_extra()}

    def _initial_params(self, ctx: RunContext) -> Any:
        """None (the strategy's random initialisation) or the parent's parameters with the re-initialised leaves
        fresh."""
        if self.parent is None:
            return None
        where = self.lineage["parent"]["data"]
        ctx.say(f"fine-tuning from {self.parent.name} (trained on table {where['table']} v{where['version']})"
                + (f"; re-initialised: {', '.join(self.reinit)}" if self.reinit else "")
                + (f"; frozen: {', '.join(self.lineage['frozen'])}" if self.lineage["frozen"] else ""))
        return init_lib.initial_params(self.parent, self.strategy.init_params(), self.reinit)

    def _diverged(self, ctx: RunContext) -> None:
        """A non-finite loss ends the run: checkpoint the state (with dev metrics) for inspection, then raise."""
        dev = evaluate(ctx, ctx.strategy.eval_params(ctx.state))
        ctx.metrics = {f"dev_{k}": v for k, v in dev.items()}
        save(ctx)
        ctx.ckpt.close()
        ctx.run.log(step=ctx.step, diverged=True)
        ctx.run.close()
        raise TrainingDivergedError(f"training diverged: the loss became NaN or inf by step {ctx.step} (see "
                                    f"{ctx.run.path / tracking.METRICS_FILE}); the state is saved in "
                                    f"{ctx.run.checkpoint_dir}/{ctx.step}. Lower optim.lr, enable optim.clip_norm "
                                    "(edge: lower edge.outer_lr), or check the data")


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, lake_root: str | Path | None = None,
          devices: list | None = None, progress: bool = True, hooks: tuple[Hook, ...] | list[Hook] = (),
          strategy: Strategy | None = None, stop_after_step: int | None = None) -> dict[str, Any]:
    """Trains ``config`` on its lake table with the strategy it selects and evaluates it; returns a summary (also
    saved in ``workdir``) with ``history``, ``params`` (best checkpoint), ``final_state`` and ``report``.

    ``config.init`` picks the starting parameters of a fresh run (:mod:`lepton_jax.train.init`: random, a run's
    checkpoint, a registry version; ``lake_root`` is also the registry's default lake); a bad setting or an
    architecture mismatch raises before anything is written. ``hooks`` are added to the loop (see
    :mod:`lepton_jax.train.hooks`). ``strategy`` reuses the compiled programs of an earlier run of the same config
    (tests, sweeps). ``stop_after_step`` stops like a preemption after that step. The summary holds
    ``preempted=True`` (and no test metrics) when SIGTERM stopped the run."""
    validate_config(config)
    parent = init_lib.resolve(config, lake_root)
    lake = Lake(lake_root or config.data.lake)
    table = lake.table(config.data.table, config.data.version if config.data.version > 0 else None)
    schema = run_schema(config, table.schema, table.record.get("stats", {}).get("splits", {}).get("train", {}))
    sources = {split: LakeDataSource(table.reader(split)) for split in ("train", "dev", "test")}
    if strategy is None:
        strategy = make_strategy(config, schema, sources["train"], devices)
    elif strategy.config.to_dict() != config.to_dict():
        raise ConfigError("the strategy passed to train() was built for another config")
    data_info = {"lake": lake.uri, "table": table.table, "version": table.version,
                 "schema": schema, "source_sha256": table.record["lineage"]["source"]["sha256"]}
    loop = Loop(config, workdir, strategy, schema=schema, sources=sources, data_info=data_info, progress=progress,
                stop_after_step=stop_after_step, parent=parent)
    for hook in hooks:
        loop.add_hook(hook)
    return loop.run()


train_and_evaluate = train  # the earlier name, kept for notebooks and scripts
