"""Preemption and crashes: SIGKILL after a checkpoint and SIGTERM mid-run both resume to the exact same result."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lepton_jax import tracking
from lepton_jax.checkpoint import Checkpointer
from lepton_jax.train.loop import Hook, train, train_and_evaluate
from tests.conftest import DEFAULT_CONFIG, small_config

OVERRIDES = {"num_epochs": 2, "eval_every_steps": 4}  # 38 steps, a checkpoint every 4
TIME_KEYS = tracking.TIMING_KEYS


def _cli(workdir, lake_root):
    cmd = [sys.executable, "-m", "lepton_jax.cli", "train", "--config", str(DEFAULT_CONFIG), "--workdir",
           str(workdir), "--lake", str(lake_root), "--no-progress"]
    return cmd + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def _wait_for_checkpoint(workdir, proc, minimum_step, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()
                 and (p / "commit_success.txt").exists()] if (workdir / "checkpoints").exists() else []
        if steps and max(steps) >= minimum_step:
            return max(steps)
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        time.sleep(0.05)
    raise TimeoutError("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(lake_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, train_and_evaluate(small_config(**OVERRIDES), workdir, lake_root=lake_root, progress=False)


def _comparable_metrics(workdir):
    out = []
    for record in tracking.read_metrics(workdir):
        if "resumed_from_step" in record or "preempted" in record:
            continue
        out.append({k: v for k, v in record.items() if k not in TIME_KEYS})
    return out


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_sigkill_then_restart_is_bit_identical(uninterrupted, lake_root, tmp_path):
    reference_dir, reference = uninterrupted
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(_cli(workdir, lake_root), env=os.environ.copy(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    killed_at = _wait_for_checkpoint(workdir, proc, minimum_step=8)
    proc.kill()  # SIGKILL: no handler runs, an async save may be half-written
    proc.wait(timeout=60)
    assert killed_at < 38
    resumed = train_and_evaluate(small_config(**OVERRIDES), workdir, lake_root=lake_root, progress=False)
    assert any("resumed_from_step" in r for r in tracking.read_metrics(workdir))
    _assert_same_params(resumed["final_state"], reference["final_state"])
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert _comparable_metrics(workdir) == _comparable_metrics(reference_dir)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()  # the killed run's events past its checkpoint are purged: each step once
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in tracking.read_metrics(reference_dir)
                                                              if "train_loss" in r]


def test_sigterm_at_many_steps_saves_the_step_it_stops_at(uninterrupted, lake_root, tmp_path):
    """SIGTERM arriving at different points of the loop (plain steps, log-fetch steps, evaluation/checkpoint steps):
    each time the run returns cleanly with the step it stopped at saved and latest; resuming after all of them
    finishes with the parameters and the metric history (same rows, same values) of an uninterrupted run. One
    compiled strategy serves every restart."""
    reference_dir, reference = uninterrupted
    workdir, strategy = tmp_path / "many", reference["strategy"]
    stops = []
    for target in (1, 3, 7, 9, 12, 15):  # stops land on plain, log-fetch (10) and eval/checkpoint (4, 8, 16) steps
        kill = Hook(lambda ctx, t=target: os.kill(os.getpid(), signal.SIGTERM) if ctx.step == t else None, every=1,
                    at_end=False, name="kill")
        out = train(small_config(**OVERRIDES), workdir, lake_root=lake_root, progress=False, hooks=[kill],
                    strategy=strategy)
        assert out.get("preempted"), (target, out["steps"])
        ckpt = Checkpointer(workdir / "checkpoints", create=False)
        assert ckpt.latest_step() == out["steps"] and out["steps"] in (target, target + 1)
        ckpt.close()
        stops.append(out["steps"])
    assert len(set(stops)) == len(stops)
    resumed = train(small_config(**OVERRIDES), workdir, lake_root=lake_root, progress=False, strategy=strategy)
    _assert_same_params(resumed["final_state"].params, reference["final_state"].params)
    assert [r["step"] for r in tracking.read_metrics(workdir) if r.get("preempted")] == stops
    assert _comparable_metrics(workdir) == _comparable_metrics(reference_dir)  # the logging grid did not shift


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(uninterrupted, lake_root, tmp_path):
    _, reference = uninterrupted
    workdir = tmp_path / "preempted"
    proc = subprocess.Popen(_cli(workdir, lake_root), env=os.environ.copy(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(workdir, proc, minimum_step=4)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    preempted = [r for r in tracking.read_metrics(workdir) if r.get("preempted")]
    assert len(preempted) == 1
    step = preempted[0]["step"]
    assert (workdir / "checkpoints" / str(step) / "commit_success.txt").exists()
    assert not (workdir / "summary.json").exists()  # it stopped early, without a test report
    if step < 38:  # resuming finishes with the same parameters as a run that was never interrupted
        resumed = train_and_evaluate(small_config(**OVERRIDES), workdir, lake_root=lake_root, progress=False)
        _assert_same_params(resumed["final_state"].params, reference["final_state"].params)


SIGKILL_AT_STEP = """
import os, signal, sys
from lepton_jax.train.loop import Hook, train
from tests.conftest import small_config

kill = Hook(lambda ctx: os.kill(os.getpid(), signal.SIGKILL) if ctx.step == int(sys.argv[3]) else None, every=1,
            at_end=False, name="kill")  # user hooks run after the step's rows are logged, before its checkpoint
train(small_config(num_epochs=2, eval_every_steps=4), sys.argv[1], lake_root=sys.argv[2], progress=False,
      hooks=[kill])
"""


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint_leaves_no_duplicate_rows(uninterrupted, lake_root, tmp_path):
    """SIGKILL at step 4 after its train and eval rows are logged but before its checkpoint (the first) is written:
    the rerun starts from scratch and its metrics.jsonl equals an uninterrupted run's (it kept the killed run's
    rows: duplicates)."""
    reference_dir, reference = uninterrupted
    assert OVERRIDES == {"num_epochs": 2, "eval_every_steps": 4}  # the script's config
    workdir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-c", SIGKILL_AT_STEP, str(workdir), str(lake_root), "4"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert [r["step"] for r in tracking.read_metrics(workdir)] == [4, 4]  # train and eval rows, no checkpoint
    assert not [p for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    resumed = train(small_config(**OVERRIDES), workdir, lake_root=lake_root, progress=False,
                    strategy=reference["strategy"])
    _assert_same_params(resumed["final_state"].params, reference["final_state"].params)
    assert _comparable_metrics(workdir) == _comparable_metrics(reference_dir)


SIGTERM_DURING_LAST_SAVE = """
import os, signal, sys
from lepton_jax.checkpoint import Checkpointer
from lepton_jax.train.loop import train
from tests.conftest import small_config

real_wait = Checkpointer.wait
def wait(self):  # the first wait for a save in flight: the last step's, right after the loop
    if not getattr(Checkpointer, "signalled", False):
        Checkpointer.signalled = True
        os.kill(os.getpid(), signal.SIGTERM)
    real_wait(self)
Checkpointer.wait = wait
summary = train(small_config(num_epochs=1), sys.argv[1], lake_root=sys.argv[2], progress=False)
print("steps", summary["steps"], "test_accuracy" in summary)
"""


@pytest.mark.slow
def test_sigterm_while_the_last_checkpoint_is_written_loses_nothing(lake_root, tmp_path):
    """SIGTERM arrives after the last step, while its checkpoint is still being written asynchronously: the loop
    still treats it as a flag until that save is on disk (it used to restore the default action first, so the
    process died with the last checkpoint half-written, a temp directory)."""
    workdir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-c", SIGTERM_DURING_LAST_SAVE, str(workdir), str(lake_root)],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    steps = int(out.stdout.split()[-2])
    names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert str(steps) in names and not [n for n in names if "tmp" in n], names
    assert (workdir / "checkpoints" / str(steps) / "commit_success.txt").exists()
    assert (workdir / "summary.json").exists()


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_saved_step(lake_root, tmp_path):
    """Two processes (gloo on 127.0.0.1, 2 devices each); SIGTERM reaches process 1 only. Both must stop after the
    same step, save it (a multi-process Orbax save completes only if both take part) and exit 0."""
    from lepton_jax.parallel.distributed import COORDINATOR, NUM_PROCESSES, PROCESS_ID, free_port

    workdir, port = tmp_path / "mp", free_port()
    cmd = _cli(workdir, lake_root) + ["--config.num_epochs=6", "--config.mesh.axes={'data': 2}",
                                      "--config.mesh.dcn_axes={'data': 2}"]
    procs = []
    for index in range(2):
        env = dict(os.environ, **{COORDINATOR: f"127.0.0.1:{port}", NUM_PROCESSES: "2", PROCESS_ID: str(index),
                                  "JAX_PLATFORMS": "cpu"})
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _wait_for_checkpoint(workdir, procs[0], minimum_step=4)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
    stopped = [re.findall(r"preempted at step (\d+) .*; JAX preemption sync\)", err) for _, err in outputs]
    assert stopped[0] == stopped[1] and len(stopped[0]) == 1, stopped
    step = int(stopped[0][0])
    assert step < 6 * (1257 // 64)
    assert [r["step"] for r in tracking.read_metrics(workdir) if r.get("preempted")] == [step]
    assert (workdir / "checkpoints" / str(step) / "commit_success.txt").exists()
    ckpt = Checkpointer(workdir / "checkpoints", create=False)
    assert ckpt.latest_step() == step
    ckpt.close()
    assert not (workdir / "summary.json").exists()


def test_train_seconds_sum_the_sessions_that_trained_the_run(uninterrupted, lake_root, tmp_path):
    """summary.json's train_seconds counts every session that trained the run: a resumed session adds its own to
    the count saved with the checkpoint it restored, and rerunning a finished run (a no-op resume) adds nothing."""
    _, reference = uninterrupted
    workdir, strategy, config = tmp_path / "sessions", reference["strategy"], small_config(**OVERRIDES)
    first = train(config, workdir, lake_root=lake_root, progress=False, strategy=strategy, stop_after_step=8)
    ckpt = Checkpointer(workdir / "checkpoints", create=False)
    before = ckpt.metrics(8)["train_seconds"]
    ckpt.close()
    assert first.get("preempted") and first["steps"] == 8 and before > 0

    finished = train(config, workdir, lake_root=lake_root, progress=False, strategy=strategy)
    summary = tracking.read_json(workdir / "summary.json")
    assert summary["train_seconds"] == finished["train_seconds"] and summary["steps"] == 38
    # at least the first session's count plus this session's loop phases up to its final checkpoint
    own = sum(v for k, v in finished["loop_time_s"].items() if k != "hook:checkpoint")
    assert summary["train_seconds"] > before + own
    resumed_evals = [r["elapsed_s"] for r in tracking.read_metrics(workdir) if "elapsed_s" in r and r["step"] > 8]
    assert resumed_evals and min(resumed_evals) > before

    rerun = train(config, workdir, lake_root=lake_root, progress=False, strategy=strategy)
    again = tracking.read_json(workdir / "summary.json")
    assert rerun["steps"] == 38 and again["train_seconds"] >= summary["train_seconds"]
    assert again["train_seconds"] == summary["train_seconds"]  # exactly what the final checkpoint saved


def test_a_checkpoint_without_saved_seconds_takes_them_from_the_finished_runs_summary(tmp_path):
    """Runs checkpointed before train_seconds was saved with each checkpoint: a rerun of the finished run keeps the
    summary's count when the summary describes the restored step, and counts from 0 otherwise."""
    from lepton_jax.train.loop import _summary_seconds

    path = tmp_path / "summary.json"
    assert _summary_seconds(path, 38) is None  # no summary: a run killed before it finished
    path.write_text(json.dumps({"steps": 38, "train_seconds": 9.5}))
    assert _summary_seconds(path, 38) == 9.5
    assert _summary_seconds(path, 8) is None  # the summary of another step
    path.write_text("{not json")
    assert _summary_seconds(path, 38) is None


SIGNAL_SCAN = """
import contextlib, io, json, os, signal, sys
import lepton_jax.eval.metrics as eval_metrics
import lepton_jax.parallel.distributed as distributed
import lepton_jax.train.loop as loop
from lepton_jax import cli, config, tracking
from lepton_jax.checkpoint import Checkpointer
from lepton_jax.lake import Lake
from lepton_jax.train.strategy import SyncStrategy

strategies, real_make = {}, loop.make_strategy
def make_strategy(cfg, *args, **kwargs):  # one compiled strategy for every run of this process (as tests do)
    key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    strategies.setdefault(key, real_make(cfg, *args, **kwargs))
    return strategies[key]
loop.make_strategy = make_strategy

def signal_at(owner, name, signum, call=1, when=lambda *a, **k: True):
    real, calls = getattr(owner, name), [0]
    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            calls[0] += 1
            if calls[0] == call:
                os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    setattr(owner, name, wrapper)
    return lambda: setattr(owner, name, real)

T, I = signal.SIGTERM, signal.SIGINT
moments = [  # (name, owner, attribute, signal, call); in order: the run's state moves on as they come
    ("config load", config, "load_config", T, 1), ("distributed init", distributed, "initialize", I, 1),
    ("lake open", Lake, "table", T, 1), ("strategy build", loop, "make_strategy", T, 1),
    ("run dir start", tracking.RunDir, "start", I, 1), ("state init", SyncStrategy, "init_state", T, 1),
    ("first step compile", SyncStrategy, "step", T, 1), ("restore", Checkpointer, "restore", T, 1),
    ("ctrl-c mid-training", SyncStrategy, "step", I, 5), ("report start", loop, "report", T, 1),
    ("report restore", Checkpointer, "restore_params", I, 1), ("report test eval", eval_metrics, "evaluate_split",
    T, 1), ("report figure", eval_metrics, "save_confusion_matrix", T, 1),
    ("report summary", tracking, "write_json_atomic", T, 1), (None, None, None, None, None)]
argv = ["train", "--config", sys.argv[3], "--workdir", sys.argv[1], "--lake", sys.argv[2], "--no-progress",
        "--config.num_epochs=2", "--config.eval_every_steps=4"]
results = []
for name, owner, attr, signum, call in moments:
    when = (lambda path, data: str(path).endswith("summary.json")) if attr == "write_json_atomic" else (
        lambda *a, **k: True)
    undo = signal_at(owner, attr, signum, call, when) if owner is not None else (lambda: None)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = cli.main(argv)
    except BaseException as e:  # a signal that escaped: the scan reports it
        code = f"escaped {type(e).__name__}"
    finally:
        undo()
    ckpts = sorted(int(p.name) for p in (__import__("pathlib").Path(sys.argv[1]) / "checkpoints").glob("*")
                   if p.name.isdigit()) if os.path.exists(os.path.join(sys.argv[1], "checkpoints")) else []
    results.append({"moment": name, "code": code, "stderr": err.getvalue(), "checkpoints": ckpts,
                    "summary": os.path.exists(os.path.join(sys.argv[1], "summary.json"))})
print(json.dumps(results))
"""


@pytest.mark.slow
def test_sigterm_and_sigint_at_every_moment_end_cleanly_and_a_rerun_finishes(uninterrupted, lake_root, tmp_path):
    """Issue 27/28: SIGTERM or SIGINT during start-up (config, distributed init, lake open, strategy build, run dir,
    state init), the first step's compile, restore, mid-training (Ctrl-C) and each part of the final report. Before
    training: 143/130 and one line; in the loop: saved at the step, exit 0 (SIGTERM) / 130 (SIGINT); during the
    report: 0 (SIGTERM) / 130 (SIGINT) with no summary.json, which the next run writes. The last rerun finishes with
    the uninterrupted run's parameters."""
    reference_dir, reference = uninterrupted
    workdir = tmp_path / "scan"
    out = subprocess.run([sys.executable, "-c", SIGNAL_SCAN, str(workdir), str(lake_root), str(DEFAULT_CONFIG)],
                         capture_output=True, text=True, timeout=400, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    scan = {r["moment"]: r for r in json.loads(out.stdout.strip().splitlines()[-1])}
    expected = {"config load": 143, "distributed init": 130, "lake open": 143, "strategy build": 143,
                "run dir start": 130, "state init": 143, "first step compile": 0, "restore": 143,
                "ctrl-c mid-training": 130, "report start": 0, "report restore": 130, "report test eval": 0,
                "report figure": 0, "report summary": 0, None: 0}
    assert {m: r["code"] for m, r in scan.items()} == expected, scan
    for moment, r in scan.items():
        lines = [line for line in r["stderr"].splitlines() if line.strip()]
        assert len(lines) <= 1 and "Traceback" not in r["stderr"], (moment, r["stderr"][-2000:])
        assert r["summary"] == (moment is None), (moment, r)  # the report is complete only when it finished
    assert scan["state init"]["checkpoints"] == []  # nothing existed to save before training started
    assert scan["first step compile"]["checkpoints"] == [1]  # the signal came during the compile: saved at step 1
    assert max(scan["ctrl-c mid-training"]["checkpoints"]) == 6  # the 5th step of that run (after step 1)
    assert "preempted at step 6" in scan["ctrl-c mid-training"]["stderr"]
    assert max(scan["report start"]["checkpoints"]) == 38
    assert "training is saved at step 38" in scan["report summary"]["stderr"]
    resumed = train(small_config(**OVERRIDES), workdir, lake_root=lake_root, progress=False,
                    strategy=reference["strategy"])  # a finished run: reports again
    _assert_same_params(resumed["final_state"].params, reference["final_state"].params)
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert [r for r in tracking.read_metrics(workdir) if r["kind"] == "summary"][-1]["steps"] == 38
