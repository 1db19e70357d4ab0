"""Retention as Orbax really applies it (latest N and best K independently), and resume picking the latest step."""

import jax.numpy as jnp
import pytest

from lepton_jax.checkpoint import Checkpointer


def _orbax_save_threads(ckpt):
    """A list that each call of Orbax's ``CheckpointManager.save`` appends its thread to."""
    import threading

    threads = []
    orbax_save = ckpt.manager.save
    ckpt.manager.save = lambda *a, **k: (threads.append(threading.current_thread()), orbax_save(*a, **k))[1]
    return threads


def _save(ckpt, step, metrics):
    ckpt.save(step, {"params": {"w": jnp.full((3,), float(step))}, "train": {"step": jnp.int32(step)}}, metrics)


@pytest.mark.parametrize("reopen", [False, True])
def test_low_scoring_latest_survives_and_best_is_kept(tmp_path, reopen):
    """The issue's scenario: dev accuracies 0.90, 0.95, 0.50, 0.60 at steps 1-4 with latest 2 + best 1: the old
    best-only retention left [1, 2]; now the latest two (3, 4) and the best (2) stay, on disk and after reopening."""
    ckpt = Checkpointer(tmp_path, keep_latest=2, keep_best=1, async_save=False)
    for step, accuracy in zip([1, 2, 3, 4], [0.90, 0.95, 0.50, 0.60], strict=True):
        _save(ckpt, step, {"dev_accuracy": accuracy})
    ckpt.close()
    if reopen:
        ckpt = Checkpointer(tmp_path, keep_latest=2, keep_best=1, create=False)
    assert ckpt.steps() == [2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "3", "4"]
    assert ckpt.latest_step() == 4 and ckpt.best_step() == 2


def test_resume_restores_the_latest_step_not_the_best(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_latest=1, keep_best=1, async_save=False)
    _save(ckpt, 5, {"dev_accuracy": 0.9})
    _save(ckpt, 6, {"dev_accuracy": 0.1})
    _save(ckpt, 7, None)  # a preemption save without an evaluation
    abstract = {"params": {"w": jnp.zeros(3)}, "train": {"step": jnp.int32(0)}}
    items, _ = ckpt.restore(abstract)
    assert int(items["train"]["step"]) == 7 and float(items["params"]["w"][0]) == 7.0
    assert ckpt.steps() == [5, 7] and ckpt.best_step() == 5
    ckpt.close()


def test_flagged_step_is_never_best_and_best_metric_is_configurable(tmp_path):
    ckpt = Checkpointer(tmp_path / "a", keep_latest=1, keep_best=1, best_metric="dev_pgd_accuracy",
                        async_save=False)
    _save(ckpt, 1, {"dev_accuracy": 0.9, "dev_pgd_accuracy": 0.30})
    _save(ckpt, 2, {"dev_accuracy": 0.99, "dev_pgd_accuracy": 0.95, "co_flagged": True})  # catastrophic overfitting
    _save(ckpt, 3, {"dev_accuracy": 0.95, "dev_pgd_accuracy": 0.20})
    assert ckpt.best_step() == 1 and ckpt.steps() == [1, 3]
    ckpt.close()
    low = Checkpointer(tmp_path / "b", keep_latest=1, keep_best=1, best_metric="dev_loss", best_mode="min",
                       async_save=False)
    for step, loss in [(1, 0.5), (2, 0.2), (3, 0.9)]:
        _save(low, step, {"dev_loss": loss})
    assert low.best_step() == 2 and low.steps() == [2, 3]
    low.close()


@pytest.mark.parametrize("metric, mode, good", [("dev_loss", "min", 0.3), ("dev_accuracy", "max", 0.9)])
def test_a_nan_metric_never_takes_the_best_checkpoints_place(tmp_path, metric, mode, good):
    """A diverged run saves its state with a NaN dev metric: that step is never best, so the real best stays on
    disk (a NaN used to compare false with every score in Orbax's sort and push the best out)."""
    ckpt = Checkpointer(tmp_path / "ck", keep_latest=1, keep_best=1, best_metric=metric, best_mode=mode,
                        async_save=False)
    bad = 0.6 if mode == "max" else 0.5
    for step, value in enumerate([bad, good, float("nan"), bad], start=1):
        ckpt.save(step, {"params": {"w": jnp.ones(2) * step}}, {metric: value})
    assert ckpt.steps() == [2, 4] and ckpt.best_step() == 2
    ckpt.close()


def test_a_damaged_latest_checkpoint_names_the_step_to_fall_back_to(tmp_path):
    import shutil

    from lepton_jax.errors import CheckpointError

    ckpt = Checkpointer(tmp_path, keep_latest=2, keep_best=0, async_save=False)
    _save(ckpt, 5, None)
    _save(ckpt, 6, None)
    shutil.rmtree(tmp_path / "6" / "train")  # one item of the newest step lost
    abstract = {"params": {"w": jnp.zeros(3)}, "train": {"step": jnp.int32(0)}}
    with pytest.raises(CheckpointError, match=rf"remove {tmp_path}/6 to use step 5 \(steps on disk: \[5, 6\]\)"):
        ckpt.restore(abstract)
    shutil.rmtree(tmp_path / "6")
    items, _ = Checkpointer(tmp_path, keep_latest=2, keep_best=0, async_save=False).restore(abstract)
    assert int(items["train"]["step"]) == 5
    ckpt.close()


def test_an_async_save_runs_off_the_callers_thread_and_survives_the_donation_of_its_arrays(tmp_path):
    """The loop donates the state to its next step as soon as ``save`` returns: the checkpoint must hold the values
    passed, although the caller's arrays are deleted at once (a background save of the originals would fail), and
    Orbax's blocking part must run on another thread (the time the loop no longer waits)."""
    import threading

    import jax
    import numpy as np

    ckpt = Checkpointer(tmp_path, keep_latest=2, keep_best=0, best_metric=None)
    threads = _orbax_save_threads(ckpt)
    items = {"params": {"w": jnp.arange(4.0) * 3}, "train": {"step": jnp.int32(7)}}
    assert ckpt.save(7, items, {"dev_accuracy": 0.5}, data_state={"position": 3})
    for leaf in jax.tree.leaves(items):
        leaf.delete()  # what donating the state to the next step does to the caller's arrays
    assert ckpt.latest_step() == 7  # waits for the background save
    assert threads and threads[0] is not threading.main_thread()
    restored, data = ckpt.restore({"params": {"w": jnp.zeros(4)}, "train": {"step": jnp.int32(0)}})
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(4.0) * 3)
    assert int(restored["train"]["step"]) == 7 and data == {"position": 3}
    ckpt.close()


def test_a_failed_background_save_is_raised_by_the_next_call(tmp_path):
    """An error on the save thread is not lost: the next method called on the checkpointer raises it."""
    ckpt = Checkpointer(tmp_path, keep_latest=2, keep_best=0, best_metric=None)
    ckpt.manager.save = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    assert ckpt.save(1, {"params": {"w": jnp.ones(2)}})
    with pytest.raises(OSError, match="disk full"):
        ckpt.wait()
    ckpt.wait()  # raised once


def test_background_copy_off_in_the_config_saves_on_the_callers_thread(tmp_path):
    """``checkpoint.background_copy = False`` (a state too large for a second copy on the device): Orbax's save runs
    on the caller's thread, with no device copy; the base config's default is the background save."""
    import threading

    from lepton_jax.checkpoint import from_config
    from lepton_jax.config import load_config

    config = load_config("configs/digits_cnn.py", ["checkpoint.background_copy=False"])
    assert load_config("configs/digits_cnn.py").checkpoint.background_copy is True
    ckpt = from_config(tmp_path, config.checkpoint)
    threads = _orbax_save_threads(ckpt)
    _save(ckpt, 3, {"dev_accuracy": 0.5})
    assert threads == [threading.current_thread()]
    ckpt.close()
