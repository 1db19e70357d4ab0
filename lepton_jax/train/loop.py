"""The training loop: lake -> Grain -> sharded jitted steps -> dev eval -> Orbax checkpoints -> test report.

Side effects (files, progress bars, signals, printing) live here; the math lives in :mod:`lepton_jax.train.step`.
A workdir holds one experiment: rerunning with the same workdir and config resumes from the latest checkpoint
(parameters, optimizer state, rng, step and the Grain iterator position), so a resumed run produces the same
parameters and metrics as an uninterrupted one. SIGTERM (preemption) saves a checkpoint and returns cleanly.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from lepton_jax import tracking
from lepton_jax.checkpoint import Checkpointer, abstract_like
from lepton_jax.data import LakeDataSource, to_global, train_dataset
from lepton_jax.data.transforms import input_spec
from lepton_jax.errors import ConfigError, TrainingDivergedError
from lepton_jax.eval import metrics as eval_metrics
from lepton_jax.lake import Lake
from lepton_jax.models import build_model
from lepton_jax.parallel import batch_sharding, make_mesh, replicated
from lepton_jax.parallel.mesh import data_parallel_size
from lepton_jax.parallel.rules import (
    logical_axes,
    named_shardings,
    param_specs,
    rules_from_config,
    sharding_table,
    state_shardings,
)
from lepton_jax.robust.monitor import make_overfitting_monitor
from lepton_jax.train import perf
from lepton_jax.train.optim import make_optimizer, make_schedule
from lepton_jax.train.state import count_params, create_state, split_model
from lepton_jax.train.step import build_train_step, make_predict, optimizer_updates_per_step


class Preemption:
    """Turns SIGTERM into a flag the loop checks between steps (only where signals can be handled)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       lake_root: str | Path | None = None, devices: list | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Trains ``config`` on its lake table and evaluates it; returns a summary (also saved in ``workdir``).

    The summary holds ``preempted=True`` (and no test metrics) when SIGTERM stopped the run early.
    """
    lake = Lake(lake_root or config.data.lake)
    version = config.data.version if config.data.version > 0 else None
    table = lake.table(config.data.table, version)
    schema = table.schema
    label_names = table.label_names
    mesh = make_mesh(config.mesh, devices)
    dp = data_parallel_size(mesh)
    accum = int(config.get("grad_accum_steps", 1))
    if config.batch_size % (dp * accum):
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by {dp} data-parallel devices x "
                          f"{accum} gradient-accumulation steps (mesh {dict(mesh.shape)})")
    train_src = LakeDataSource(table.reader("train"))
    dev_src = LakeDataSource(table.reader("dev"))
    test_src = LakeDataSource(table.reader("test"))
    steps_per_epoch = len(train_src) // config.batch_size
    total_steps = steps_per_epoch * config.num_epochs
    eval_every = int(config.get("eval_every_steps", 0)) or steps_per_epoch

    def new_model() -> nnx.Module:
        return build_model(config.model, input_shape=tuple(input_spec(schema)["example_shape"]),
                           num_classes=len(label_names), seed=config.seed)

    abstract_model = nnx.eval_shape(new_model)
    graphdef, abstract_params = split_model(abstract_model)
    rules, min_size = rules_from_config(config.get("sharding"))
    specs = param_specs(logical_axes(abstract_model), abstract_params, rules, mesh, min_size)
    param_sh = named_shardings(specs, mesh)
    updates_per_step = optimizer_updates_per_step(config)
    tx = make_optimizer(config.optim, total_steps * updates_per_step)
    schedule = make_schedule(config.optim, total_steps * updates_per_step)

    def init_state():
        return create_state(split_model(new_model())[1], tx, config.seed)

    state_sh = state_shardings(jax.eval_shape(init_state), param_sh, mesh)
    state = jax.jit(init_state, out_shardings=state_sh)()  # parameters are created already sharded
    repl, data_sh = replicated(mesh), batch_sharding(mesh)
    train_step = jax.jit(build_train_step(config, graphdef, tx), in_shardings=(state_sh, data_sh),
                         out_shardings=(state_sh, repl), donate_argnums=0)
    predict = jax.jit(make_predict(graphdef), in_shardings=(param_sh, data_sh), out_shardings=data_sh)
    # single-step adversarial training (FGSM, FGSM-RS, free): watch for catastrophic overfitting at every evaluation
    monitor = make_overfitting_monitor(config, graphdef, dev_src, schema, data_sh)
    eval_batch = config.get("eval_batch_size", 256)
    eval_batch += (-eval_batch) % dp

    run = tracking.RunDir(workdir)
    run.check_same_config(config)
    data_info = {"lake": str(lake.root.resolve()), "table": table.table, "version": table.version,
                 "schema": schema, "source_sha256": table.record["lineage"]["source"]["sha256"]}
    run.start(config, extra={"data": data_info, "seed": config.seed, "mesh": dict(mesh.shape),
                             "num_params": count_params(abstract_params)})
    ckpt = Checkpointer(run.checkpoint_dir, max_to_keep=config.checkpoint.max_to_keep,
                        best_metric="dev_accuracy")
    _say(progress, f"lake {lake.root} table {table.table} v{table.version}: train {len(train_src)}, "
                   f"dev {len(dev_src)}, test {len(test_src)} examples")
    _say(progress, f"model {config.model.name}: {count_params(abstract_params):,} parameters; "
                   f"{total_steps} steps of batch {config.batch_size}; parameter sharding:\n"
                   f"{sharding_table(abstract_params, specs, mesh)}")

    batches = iter(train_dataset(train_src, global_batch_size=config.batch_size, seed=config.seed,
                                 num_epochs=config.num_epochs, schema=schema))
    start_step = 0
    if ckpt.latest_step() is not None:  # same workdir, same config: continue where the last run stopped
        state, data_state = ckpt.restore(abstract_like(state, state_sh))
        batches.set_state(data_state)
        start_step = int(jax.device_get(state.step))
        run.truncate_metrics(after_step=start_step)  # lines a killed run logged after its last checkpoint
        run.log(step=start_step, resumed_from_step=start_step)
        _say(progress, f"resuming from checkpoint step {start_step} in {run.checkpoint_dir}")

    history: dict[str, list] = {"step": [], "loss": [], "dev_accuracy": []}
    log_every = max(1, int(config.get("log_every_steps", 10)))
    pending: list = []
    flops = None
    if perf.peak_flops() is not None:  # FLOPs only matter where an MFU can be stated (accelerators)
        flops = perf.compiled_flops(train_step, state, to_global(next(iter(train_dataset(
            train_src, global_batch_size=config.batch_size, seed=config.seed, num_epochs=1, schema=schema))),
            data_sh))
    profile = Profiler(run.path / "profile", int(config.get("profile_start_step", 0)),
                       int(config.get("profile_steps", 0)))
    stopped_early = None
    start = last_log = time.perf_counter()
    with Preemption() as preemption, tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                                           disable=not progress or jax.process_index() != 0) as bar:
        for step in range(start_step + 1, total_steps + 1):
            profile.before(step)
            state, step_metrics = train_step(state, to_global(next(batches), data_sh))
            profile.after(step, state)
            pending.append(step_metrics)
            epoch = (step - 1) // steps_per_epoch + 1
            boundary = step % eval_every == 0 or step == total_steps or preemption.requested
            if len(pending) == log_every or boundary:
                fetched = jax.device_get(pending)
                now = time.perf_counter()
                step_time = (now - last_log) / len(fetched)
                last_log = now
                history["step"] += list(range(step - len(fetched) + 1, step + 1))
                history["loss"] += [float(m["loss"]) for m in fetched]
                mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                timing = {"step_time_s": step_time, "examples_per_s": config.batch_size / step_time}
                utilisation = perf.mfu(flops, 1.0 / step_time)
                if utilisation is not None:
                    timing["mfu"] = utilisation
                run.log(step=step, epoch=epoch, lr=float(schedule((step - 1) * updates_per_step)),
                        **{f"train_{k}": v for k, v in mean.items()}, **timing)
                if not all(np.isfinite(m["loss"]) for m in fetched):
                    _stop_on_divergence(run, ckpt, state, step, predict, dev_src, schema, eval_batch, data_sh,
                                        batches)
                bar.set_postfix(epoch=epoch, loss=f"{mean['loss']:.4f}")
                bar.update(len(fetched))
                pending = []
            if boundary:
                dev = _evaluate(predict, state.params, dev_src, schema, eval_batch, data_sh)
                history["dev_accuracy"].append(dev["accuracy"])
                run.log(step=step, epoch=epoch, dev_loss=dev["loss"], dev_accuracy=dev["accuracy"],
                        elapsed_s=time.perf_counter() - start)
                ckpt.save(state, {"dev_accuracy": dev["accuracy"], "dev_loss": dev["loss"]},
                          data_state=batches.get_state())
                if progress and jax.process_index() == 0:
                    bar.write(f"step {step} (epoch {epoch}): train loss {history['loss'][-1]:.4f}  "
                              f"dev loss {dev['loss']:.4f}  dev accuracy {dev['accuracy']:.4f}")
                if monitor is not None:
                    co = monitor(state.params)
                    run.log(step=step, epoch=epoch, **co)
                    if co["co_flagged"]:
                        _say(progress, f"step {step}: catastrophic overfitting suspected: dev FGSM accuracy "
                                       f"{co['co_fgsm_accuracy']:.3f}, PGD accuracy {co['co_pgd_accuracy']:.3f}"
                                       + ("; stopping (robust.monitor_early_stop)" if co["co_stop"] else ""))
                    if co["co_stop"]:
                        stopped_early = "catastrophic_overfitting"
            if preemption.requested:
                ckpt.close()
                run.log(step=step, preempted=True)
                run.close()
                _say(progress, f"SIGTERM: saved checkpoint at step {step}; rerun the same command to resume")
                return {"preempted": True, "steps": step, "history": history, "final_state": state}
            if stopped_early:
                break
    summary, best_params, report = finish_run(
        run, ckpt, abstract_params=abstract_like(state.params, param_sh), predict=predict, test_src=test_src,
        schema=schema, eval_batch=eval_batch, data_sharding=data_sh, history=history,
        train_seconds=time.perf_counter() - start, steps=int(jax.device_get(state.step)),
        data_version=table.version, extra={"stopped_early": stopped_early} if stopped_early else None,
        progress=progress)
    best_step = summary["best_step"]
    _say(progress, f"\ntest classification report (checkpoint step {best_step}, best dev accuracy):\n"
                   f"{report['report_text']}")
    _say(progress, f"test accuracy {report['accuracy']:.4f}\nwrote {Path(workdir)}/: config.json run.json "
                   "metrics.jsonl report.txt report.json confusion_matrix.png summary.json checkpoints/")
    return {**summary, "history": history, "params": best_params, "final_state": state, "report": report}


def finish_run(run: tracking.RunDir, ckpt: Checkpointer, *, abstract_params: Any, predict, test_src: LakeDataSource,
               schema: dict[str, Any], eval_batch: int, data_sharding, history: dict[str, list],
               train_seconds: float, steps: int, data_version: int, extra: dict[str, Any] | None = None,
               progress: bool = False) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """The end of a run: restores the best checkpoint (by dev accuracy), evaluates it on the test split, writes
    report.txt/json, confusion_matrix.png and summary.json, and closes the run and checkpointer.

    Returns ``(summary, best_params, report)``; ``extra`` entries are added to the summary."""
    ckpt.wait()
    best_step = ckpt.best_step()
    best_params = ckpt.restore_params(abstract_params, best_step)
    ckpt.close()
    label_names = list(schema["label_names"])
    outputs = eval_metrics.evaluate_split(predict, best_params, test_src, schema=schema,
                                          global_batch_size=eval_batch, sharding=data_sharding, progress=progress)
    report = eval_metrics.classification_summary(outputs["labels"], outputs["logits"].argmax(-1), label_names)
    test_loss = eval_metrics.summary_metrics(outputs["logits"], outputs["labels"])["loss"]
    best_dev = max([r["dev_accuracy"] for r in tracking.read_metrics(run.path) if "dev_accuracy" in r]
                   + history["dev_accuracy"], default=None)
    summary = {"test_accuracy": report["accuracy"], "test_loss": test_loss, "best_step": best_step,
               "best_dev_accuracy": best_dev, "train_seconds": train_seconds, "steps": steps,
               "data_version": data_version, **(extra or {})}
    run.log(**summary)
    if run.is_writer:
        out = run.path
        (out / "report.txt").write_text(report["report_text"])
        tracking.write_json_atomic(out / "report.json", {k: report[k] for k in ("accuracy", "report",
                                                                                 "confusion_matrix")})
        eval_metrics.save_confusion_matrix(report["confusion_matrix"], label_names, out / "confusion_matrix.png",
                                           title=f"test split, step {best_step}: accuracy {report['accuracy']:.4f}")
        tracking.write_json_atomic(out / "summary.json", summary)
        run.update_run_info(finished=True, summary=summary)
    run.close()
    return summary, best_params, report


class Profiler:
    """Traces ``steps`` steps starting at ``start_step`` (after warm-up) into ``directory`` (TensorBoard/Perfetto)."""

    def __init__(self, directory: Path, start_step: int, steps: int):
        self.directory, self.start, self.stop = directory, start_step, start_step + steps
        self.enabled = steps > 0 and jax.process_index() == 0

    def before(self, step: int) -> None:
        if self.enabled and step == self.start:
            jax.profiler.start_trace(str(self.directory))

    def after(self, step: int, state) -> None:
        if self.enabled and step == self.stop - 1:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()


def _stop_on_divergence(run, ckpt, state, step, predict, dev_src, schema, eval_batch, data_sh, batches) -> None:
    """A non-finite loss ends the run: checkpoint the state for inspection, then raise a clear error."""
    dev = _evaluate(predict, state.params, dev_src, schema, eval_batch, data_sh)
    ckpt.save(state, {"dev_accuracy": dev["accuracy"], "dev_loss": dev["loss"]}, data_state=batches.get_state())
    ckpt.close()
    run.log(step=step, diverged=True)
    run.close()
    raise TrainingDivergedError(f"training diverged: the loss became NaN or inf by step {step} (see "
                                f"{run.path / tracking.METRICS_FILE}); the state is saved in "
                                f"{run.checkpoint_dir}/{step}. Lower optim.lr, enable optim.clip_norm, or check "
                                "the data")


def _evaluate(predict, params, source, schema, batch_size, sharding) -> dict[str, float]:
    out = eval_metrics.evaluate_split(predict, params, source, schema=schema, global_batch_size=batch_size,
                                      sharding=sharding)
    return eval_metrics.summary_metrics(out["logits"], out["labels"])


def _say(enabled: bool, message: str) -> None:
    if enabled and jax.process_index() == 0:
        print(message, flush=True)
