"""Augmentation (config.augment): shipped transforms stay in the input box, the Grain random map is the same for any
number of processes and resumes from the iterator state, bad steps are one-line errors, a plug-in by import path
works, and a run interrupted mid-training and resumed with augmentation on equals an uninterrupted one."""

import json
import os
import signal

import numpy as np
import pytest

from lepton_jax import tracking
from lepton_jax.cli import main
from lepton_jax.data import LakeDataSource, train_dataset
from lepton_jax.data.augment import AUGMENTATIONS, Augment, parse_augment
from lepton_jax.errors import ConfigError
from lepton_jax.lake import Lake
from lepton_jax.train.loop import Hook, train
from tests.conftest import small_config

SPEC = (("random_shift", {"max_shift": 1}), ("gaussian_noise", {"std": 0.05}))


@pytest.fixture(scope="module")
def table(lake_root):
    return Lake(lake_root).table("digits")


def _stream(table, n, it=None, rows=None, **kwargs):
    kwargs = {"global_batch_size": 32, "seed": 3, "num_epochs": 2, "schema": table.schema, **kwargs}
    it = it or iter(train_dataset(LakeDataSource(table.reader("train")), **kwargs))
    return [next(it) for _ in range(n)], it


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_each_shipped_augmentation_keeps_shape_dtype_and_box(name):
    x = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)
    out = Augment((name,), slice(0, 16))({"input": x}, np.random.default_rng(1))["input"]
    assert out.shape == x.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0 and not np.array_equal(out, x)


def test_random_shift_translates_and_fills_with_zero():
    x = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
    out = np.stack([AUGMENTATIONS["random_shift"](x, np.random.default_rng(s), max_shift=1) for s in range(40)])
    assert {int(np.count_nonzero(o == 0)) for o in out} <= {0, 4, 7}  # no shift, one axis, both axes
    assert all(np.isin(o[o != 0], x).all() for o in out) and len({o.tobytes() for o in out}) > 4


def test_augmented_batches_are_seeded_process_independent_and_resume_exactly(table):
    plain, _ = _stream(table, 3)
    first, _ = _stream(table, 3, augment=SPEC)
    again, it = _stream(table, 2, augment=SPEC)
    for p, a, b in zip(plain, first, again, strict=False):
        assert not np.array_equal(p["input"], a["input"])
        np.testing.assert_array_equal(a["input"], b["input"])
        np.testing.assert_array_equal(p["label"], a["label"])  # the same examples, augmented
    assert not np.array_equal(first[0]["input"], first[1]["input"])
    state = it.get_state()  # after 2 batches: a fresh iterator at this state continues the stream exactly
    restored = iter(train_dataset(LakeDataSource(table.reader("train")), global_batch_size=32, seed=3, num_epochs=2,
                                  schema=table.schema, augment=SPEC))
    restored.set_state(state)
    np.testing.assert_array_equal(next(restored)["input"], first[2]["input"])
    halves = [_stream(table, 1, augment=SPEC, process_index=i, process_count=2)[0][0]["input"] for i in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), first[0]["input"])  # 2 processes: the same global batch


def test_edge_training_batches_are_augmented_too(table):
    """Edge training (one block of rows per node) augments its train batches the same way."""
    from lepton_jax.train.edge import node_dataset, node_partitions

    source = LakeDataSource(table.reader("train"))
    parts = node_partitions(len(source), 4, "iid", 0, None)
    plain, aug = (next(iter(node_dataset(source, parts, per_node_batch=8, seed=0, num_epochs=1, schema=table.schema,
                                         augment=spec))) for spec in ((), SPEC))
    np.testing.assert_array_equal(plain["label"], aug["label"])
    assert not np.array_equal(plain["input"], aug["input"]) and 0.0 <= aug["input"].min() <= aug["input"].max() <= 1.0


def test_bad_steps_are_one_line_config_errors():
    for spec, expected in ((("flip_upside_down",), "unknown augmentation"),
                           ((("random_shift", {"max_sift": 1}),), "does not take"),
                           ((("random_shift", 1),), "pair"), ("random_shift", "tuple of steps"),
                           (("no_such_module_xyz:f",), "cannot import")):
        with pytest.raises(ConfigError, match=expected):
            parse_augment(spec)


def test_a_plugin_augmentation_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "myaug.py").write_text("def invert(x, rng, *, strength=1.0):\n    return 1.0 - strength * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x = np.full((2, 3), 0.25, np.float32)
    out = Augment((("myaug:invert", {"strength": 2.0}),), slice(0, 2))({"input": x}, np.random.default_rng(0))
    np.testing.assert_array_equal(out["input"], np.full((2, 3), 0.5, np.float32))


def test_the_cli_rejects_a_bad_augment_override_before_writing(lake_root, tmp_path, capsys):
    code = main(["train", "--config", "digits_cnn", "--workdir", str(tmp_path / "run"), "--lake", str(lake_root),
                 "--no-progress", "--config.augment=('random_flip',)"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "unknown augmentation 'random_flip'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_interrupted_and_resumed_with_augmentation_equals_uninterrupted(lake_root, tmp_path):
    """SIGTERM at step 7 of 38 (saved there), then a rerun: the parameters and metric history equal a run that was
    never interrupted, with the augmentation recorded in run.json (the resume harness of tests/test_resume.py)."""
    from tests.test_resume import _assert_same_params, _comparable_metrics

    config = small_config(num_epochs=2, eval_every_steps=4, augment=SPEC)
    straight = train(config, tmp_path / "straight", lake_root=lake_root, progress=False)
    strategy, workdir = straight["strategy"], tmp_path / "stopped"
    kill = Hook(lambda ctx: os.kill(os.getpid(), signal.SIGTERM) if ctx.step == 7 else None, every=1, at_end=False,
                name="kill")
    stopped = train(config, workdir, lake_root=lake_root, progress=False, hooks=[kill], strategy=strategy)
    assert stopped.get("preempted") and stopped["steps"] in (7, 8)
    resumed = train(config, workdir, lake_root=lake_root, progress=False, strategy=strategy)
    _assert_same_params(resumed["final_state"].params, straight["final_state"].params)
    assert _comparable_metrics(workdir) == _comparable_metrics(tmp_path / "straight")
    info = json.loads((workdir / tracking.RUN_FILE).read_text())
    assert info["augment"] == [{"name": "random_shift", "params": {"max_shift": 1}},
                               {"name": "gaussian_noise", "params": {"std": 0.05}}]


def test_a_run_saved_before_augment_existed_resumes_with_the_same_config(tmp_path):
    """config.json of a run from before the ``augment`` key: the same config continues it (the new key counts as its
    default), a changed one is still refused."""
    from lepton_jax.config import to_dict

    config = small_config()
    old = to_dict(config)
    del old["augment"]
    (tmp_path / tracking.CONFIG_FILE).write_text(json.dumps(old))
    run = tracking.RunDir(tmp_path)
    run.check_same_config(config)
    with pytest.raises(ConfigError, match="different config.*augment"):
        run.check_same_config(small_config(augment=SPEC))
