"""Tracking: TensorBoard events read back with TensorBoard's own reader (grouped tags, test metrics, hparams, the
confusion matrix image, no duplicate steps after a crash and resume), strict JSON metrics with a kind, W&B offline
and `runs compare` with the device/process layout."""

import json
from collections import Counter
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lepton_jax import runs, tracking
from lepton_jax.train import Hook, train  # the public paths README documents
from tests.conftest import small_config


def events(directory: Path) -> EventAccumulator:
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def strict_lines(workdir: Path) -> list[dict]:
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    lines = (workdir / tracking.METRICS_FILE).read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def test_tensorboard_has_grouped_tags_test_metrics_hparams_and_the_confusion_matrix(trained_run):
    workdir, result = trained_run
    acc = events(workdir / "tensorboard")
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/epoch", "dev/accuracy", "dev/loss", "test/accuracy",
            "test/loss"} <= set(tags["scalars"]), tags["scalars"]
    assert not [t for t in tags["scalars"] if "/" not in t]  # every tag is grouped
    (test_accuracy,) = acc.Scalars("test/accuracy")
    assert test_accuracy.value == pytest.approx(result["test_accuracy"]) and test_accuracy.step == result["steps"]
    for tag in ("train/epoch", "train/loss", "dev/accuracy"):  # one value per step (epoch was logged twice)
        steps = [e.step for e in acc.Scalars(tag)]
        assert len(steps) == len(set(steps)), tag
    (image,) = acc.Images("test/confusion_matrix")
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and image.width > 100

    hp = events(workdir / "tensorboard" / "hparams")
    content = hp.PluginTagToContent("hparams")
    start = next(plugin_data_pb2.HParamsPluginData.FromString(v).session_start_info for v in content.values()
                 if plugin_data_pb2.HParamsPluginData.FromString(v).HasField("session_start_info"))
    assert start.hparams["optim.lr"].number_value == pytest.approx(3e-3)
    assert start.hparams["model.name"].string_value == "cnn"
    assert start.hparams["num_epochs"].number_value == 3
    assert hp.Scalars("hparam/test/accuracy")[0].value == pytest.approx(result["test_accuracy"])
    assert hp.Scalars("hparam/dev/best_accuracy")[0].value == pytest.approx(result["best_dev_accuracy"])


def test_metrics_jsonl_is_strict_json_with_a_kind(trained_run, tmp_path):
    workdir, _ = trained_run
    kinds = Counter(r["kind"] for r in strict_lines(workdir))
    assert kinds["train"] > 0 and kinds["eval"] == 3 and kinds["summary"] == 1, kinds
    run = tracking.RunDir(tmp_path / "nan")
    run.start(small_config())
    run.log(step=1, train_loss=float("nan"), train_accuracy=0.5, lr=float("inf"))
    run.close()
    (record,) = strict_lines(tmp_path / "nan")
    assert record == {"kind": "train", "step": 1, "train_loss": None, "train_accuracy": 0.5, "lr": None,
                      "nonfinite": ["lr", "train_loss"]}


@pytest.mark.slow
def test_crash_and_resume_leave_no_duplicate_steps_in_tensorboard_and_w_and_b_offline(lake_root, tmp_path):
    """A run dies at step 13 (checkpoint at 10) after logging steps 11-13; the resumed run purges them."""
    config = small_config(**{"num_epochs": 1, "log_every_steps": 1, "eval_every_steps": 10, "tracking.wandb": True,
                             "tracking.wandb_mode": "offline"})
    workdir = tmp_path / "run"

    def die(ctx):
        if ctx.step == 13:
            ctx.ckpt.wait()  # let the async save of step 10 finish, as a process alive that long would
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, workdir, lake_root=lake_root, progress=False, hooks=[Hook(die, every=1, at_end=False)])
    before = [e.step for e in events(workdir / "tensorboard").Scalars("train/loss")]
    assert max(before) == 13  # events past the checkpoint exist: the resume must purge them
    result = train(config, workdir, lake_root=lake_root, progress=False)
    loss_steps = [e.step for e in events(workdir / "tensorboard").Scalars("train/loss")]
    assert loss_steps == list(range(1, result["steps"] + 1))
    train_steps = [r["step"] for r in strict_lines(workdir) if r["kind"] == "train"]
    assert train_steps == list(range(1, result["steps"] + 1))

    offline = sorted((workdir / "wandb").glob("offline-run-*"))  # W&B offline: the run and its resume, one id
    assert len({p.name.split("-")[3] for p in offline}) == 1, offline
    logged = b"".join(p.read_bytes() for p in (workdir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert b"train/loss" in logged and b"test/accuracy" in logged and b"optim" in logged


def test_runs_compare_shows_devices_and_processes(trained_run):
    workdir, _ = trained_run
    summary = runs.run_summary(workdir)
    assert summary["layout"] == "1 process × 8 devices"  # issue 28: "8 × 1" read either way round
    text = runs.table([summary])
    assert "layout" in text.splitlines()[0] and "| 1 process × 8 devices |" in text
    assert runs.layout(2, 8) == "2 processes × 4 devices" and runs.layout(None, 8) == "?"


def test_run_json_records_the_cpu_model_and_the_isa_xla_compiles_for(trained_run):
    """Issue 27: results move with the CPU's ISA (0.9742 with AVX2, 0.9705 capped to AVX); run.json says which."""
    from lepton_jax.tracking import cpu_isa

    run = json.loads((trained_run[0] / "run.json").read_text())["machine"]
    assert run["cpu_model"] and run["cpu_isa_xla"] and run["label"].startswith(run["cpu_model"])
    assert run["gpu"] is None  # the tests run on CPU devices
    avx2 = {"flags": "fpu sse4_2 avx avx2 fma"}
    assert cpu_isa(avx2, "") == ("AVX2", "AVX2")
    assert cpu_isa(avx2, "--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=AVX") == ("AVX2", "AVX")
    assert cpu_isa({"flags": "sse4_2 avx"}, "--xla_cpu_max_isa=AVX512") == ("AVX", "AVX")
