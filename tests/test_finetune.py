"""Fine-tuning (lepton_jax.train.init): starting parameters from a registry version or a run directory, re-initialised
and frozen leaves, lineage, and the one-line errors of a bad init setting or an architecture mismatch."""

import json
import shutil

import jax
import numpy as np
import pytest

from lepton_jax import tracking
from lepton_jax.cli import main
from lepton_jax.errors import ConfigError, LeptonError
from lepton_jax.lake import DigitsSource, Lake, ingest
from lepton_jax.parallel import make_mesh
from lepton_jax.parallel.mesh import mesh_config
from lepton_jax.serve.registry import Registry
from lepton_jax.train import init as init_lib
from lepton_jax.train.loop import train_and_evaluate
from lepton_jax.train.validate import validate_config
from tests.conftest import ROOT, small_config
from tests.serving import served_classes

PARITY = {str(d): "even" if d % 2 == 0 else "odd" for d in range(10)}  # a changed label set: 10 classes -> 2


def _leaves(params) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {init_lib.param_path(p): np.asarray(a) for p, a in flat}


@pytest.mark.parametrize("overrides, message", [
    ({"init.source": "checkpoint"}, "unknown init.source 'checkpoint'"),
    ({"init.source": "registry"}, "init.source='registry' needs init.ref"),
    ({"init.source": "run"}, "init.source='run' needs init.workdir"),
    ({"init.source": "run", "init.workdir": "x", "init.checkpoint": "last"}, "unknown init.checkpoint 'last'"),
    ({"init.reinit": "('head/.*',)"}, "init.reinit applies to stored parameters"),
    ({"optim.freeze": "'convs'"}, "override optim.freeze='convs': expected tuple"),
    ({"optim.freeze": "('conv[',)"}, "optim.freeze: invalid regular expression"),
    ({"optim.lr_multipliers": "(('head/.*', 0.0),)"}, "optim.lr_multipliers entries are (pattern, multiplier > 0)"),
])
def test_bad_init_settings_are_one_config_error(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate_config(small_config(**overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_stage_or_run_without_checkpoints_fails_before_anything_is_written(lake_root, trained_run, tmp_path,
                                                                                  capsys):
    workdir = tmp_path / "run"
    code = main(["train", "--config", str(ROOT / "configs" / "digits_cnn.py"), "--workdir", str(workdir),
                 "--lake", str(lake_root), "--no-progress", "--config.init.source=registry",
                 "--config.init.ref=digits@production"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no model 'digits'" in err, err
    assert not workdir.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(LeptonError, match="is not a training run directory"):
        init_lib.resolve(small_config(**{"init.source": "run", "init.workdir": str(tmp_path / "empty")}))
    bare = tmp_path / "bare"  # a run's config and run.json, but no checkpoints
    bare.mkdir()
    for name in ("config.json", "run.json"):
        shutil.copy(trained_run[0] / name, bare / name)
    with pytest.raises(LeptonError, match="has no checkpoints/ folder"):
        init_lib.resolve(small_config(**{"init.source": "run", "init.workdir": str(bare)}))


@pytest.mark.slow
def test_finetune_from_production_with_a_new_head_trains_registers_and_serves(trained_run, lake_root, tmp_path,
                                                                             capsys):
    """digits@production (10 classes) -> a parity table (2 classes): the head is re-initialised, the convolutions
    frozen (bit-identical after training with weight decay on, on the 8-device data-parallel mesh); the run's
    lineage names the parent and both table versions; it registers and serves. A second run starts from the
    first one's run directory."""
    lake = tmp_path / "lake"
    shutil.copytree(lake_root, lake)  # the registry and the new table go into a copy, not the shared lake
    registry = Registry(lake)
    parent = registry.register("digits", trained_run[0])
    registry.promote("digits", parent.version, "production")
    ingest(Lake(lake), "parity", DigitsSource(), label_map=PARITY)
    base = {"data.table": "parity", "num_epochs": 1, "init.source": "registry", "init.ref": "digits@production"}

    # the head's shape changes with the classes: without init.reinit that is one line naming the leaves, exit 2
    bad = tmp_path / "bad"
    code = main(["train", "--config", str(ROOT / "configs" / "digits_cnn.py"), "--workdir", str(bad), "--lake",
                 str(lake), "--no-progress", *[f"--config.{k}={v}" for k, v in base.items()]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "head/bias float32[10] vs float32[2]" in err and "head/kernel float32[128, 10] vs float32[128, 2]" in err
    assert "digits@1 (digits@production)" in err and "hidden" not in err and not bad.exists()

    config = small_config(**base, **{"init.reinit": "('head/.*',)", "optim.freeze": "('convs/.*',)",
                                     "optim.warmup_steps": 0, "optim.weight_decay": 1e-2})
    workdir = tmp_path / "finetuned"
    result = train_and_evaluate(config, workdir, lake_root=lake, progress=False)
    assert result["test_accuracy"] > 0.8  # parity from pretrained features, one epoch (chance: 0.5)
    assert result["strategy"].mesh.shape == {"data": 8}
    stored = _leaves(parent.restore(make_mesh(mesh_config({"data": -1})))[1])
    final = _leaves(result["final_state"].params)
    for path in ("convs/0/kernel", "convs/0/bias", "convs/1/kernel", "convs/1/bias"):
        assert final[path].tobytes() == stored[path].tobytes(), path  # frozen: bit-identical
    assert not np.array_equal(final["hidden/kernel"], stored["hidden/kernel"])  # trained from the stored value
    assert final["head/kernel"].shape == (128, 2)

    lineage = tracking.read_json(workdir / "run.json")["lineage"]
    assert lineage["parent"]["model"] == "digits@1" and lineage["parent"]["ref"] == "digits@production"
    assert lineage["parent"]["data"]["table"] == "digits" and lineage["parent"]["data"]["version"] == 1
    assert lineage["data"]["table"] == "parity" and lineage["data"]["version"] == 1
    assert lineage["reinitialized"] == ["head/bias", "head/kernel"]
    assert lineage["frozen"] == ["convs/0/bias", "convs/0/kernel", "convs/1/bias", "convs/1/kernel"]
    assert json.loads((workdir / "summary.json").read_text())["lineage"] == lineage

    child = registry.register("parity", workdir)
    assert child.record["lineage"]["parent"]["model"] == "digits@1"
    assert child.record["lineage"]["data"] == {"lake": str(lake.resolve()), "table": "parity", "version": 1}
    rows = Lake(lake).table("parity").reader("test").read_all()
    from lepton_jax.serve import Predictor
    from lepton_jax.serve.server import ServedModel

    offline = Predictor.from_registry(registry.resolve("parity@1")).predict(rows["image"][:16])["class"]
    model = ServedModel.from_registry(lake, "parity@1")
    assert model.label_names == ["even", "odd"]
    assert served_classes(model, rows["image"][:16]) == offline.tolist()

    # from a run directory: the fine-tuned run's latest checkpoint, same architecture, nothing re-initialised
    second = small_config(**{"data.table": "parity", "num_epochs": 1, "init.source": "run",
                             "init.workdir": str(workdir), "init.checkpoint": "latest"})
    out = train_and_evaluate(second, tmp_path / "second", lake_root=lake, progress=False, stop_after_step=1)
    assert out["preempted"] and out["steps"] == 1
    lin = tracking.read_json(tmp_path / "second" / "run.json")["lineage"]
    assert lin["parent"]["source"] == "run" and lin["parent"]["step"] == result["steps"]
    assert lin["parent"]["parent"]["model"] == "digits@1" and lin["reinitialized"] == []


@pytest.mark.slow
def test_parameter_groups_on_an_fsdp_mesh_keep_each_parameters_sharding(lake_root):
    """Optimizer state of the grouped (multi_transform) optimizer follows its parameter's sharding, and a sharded
    step on 8 devices leaves the frozen leaves bit-identical."""
    from lepton_jax.data import LakeDataSource
    from lepton_jax.train.choose import make_strategy

    config = small_config(**{"mesh.axes": "{'fsdp': -1}", "sharding.rules": "fsdp", "optim.warmup_steps": 0,
                             "optim.freeze": "('hidden/.*',)", "optim.lr_multipliers": "(('convs/.*', 0.1),)"})
    table = Lake(lake_root).table("digits")
    strategy = make_strategy(config, table.schema, LakeDataSource(table.reader("train")))
    params_sh = _leaves_of(strategy.state_shardings.params)
    assert params_sh["hidden/kernel"].spec != params_sh["hidden/bias"].spec  # the big kernel is split over fsdp
    sharded = []
    for path, sharding in jax.tree_util.tree_flatten_with_path(strategy.state_shardings.opt_state)[0]:
        name = init_lib.param_path(path)
        owner = next((p for p in params_sh if name.endswith(p)), None)
        if owner is not None:  # an Adam moment of a parameter
            assert sharding == params_sh[owner], name
            sharded += [name] if len(sharding.spec) else []
    assert any(name.endswith("convs/1/kernel") for name in sharded), sharded
    assert not any(init_lib.param_path(p).endswith("hidden/kernel")  # frozen: no optimizer state at all
                   for p, _ in jax.tree_util.tree_flatten_with_path(strategy.state_shardings.opt_state)[0])
    state = strategy.init_state()
    before = _leaves(state.params)
    batch = next(strategy.batches(LakeDataSource(table.reader("train")), table.schema))
    batch = jax.device_put(batch, strategy.data_sharding)
    for _ in range(2):
        state, _ = strategy.step(state, batch)
    after = _leaves(state.params)
    assert after["hidden/kernel"].tobytes() == before["hidden/kernel"].tobytes()
    assert after["hidden/bias"].tobytes() == before["hidden/bias"].tobytes()
    assert not np.array_equal(after["convs/0/kernel"], before["convs/0/kernel"])


def _leaves_of(tree) -> dict:
    return {init_lib.param_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
