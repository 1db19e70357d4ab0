"""Tasks as plug-ins: regression, multi-label and dense targets end to end (train, eval, predict, register, serve,
export: the edge artifact answers what predict answers) and a custom task by import path from a module outside the
package; classification's behaviour is covered by the existing training tests."""

import json
import textwrap
import warnings

import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_diabetes

from lepton_jax.cli import main
from lepton_jax.config import load_config
from lepton_jax.data.transforms import input_array
from lepton_jax.errors import ConfigError
from lepton_jax.lake import Lake
from lepton_jax.serve import Predictor
from lepton_jax.serve.client import infer_request
from lepton_jax.serve.edge import EdgeModel
from lepton_jax.serve.registry import Registry
from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel
from lepton_jax.tasks import make_task
from lepton_jax.tasks.base import Task
from tests.conftest import DEFAULT_CONFIG, ROOT


def _export_round_trip(tmp_path, workdir, x, *source):
    """``lepton-jax export`` of ``source`` (registry args, or the run): the artifact's loader answers what the run's
    ``predict`` answers (names, shapes, dtypes; equal classes/masks/labels, float outputs to 1e-4)."""
    art = tmp_path / "art"
    assert main(["export", *(source or ("--workdir", str(workdir))), "--output", str(art), "--platforms", "cpu"]) == 0
    expected = Predictor.from_workdir(workdir).predict(x)
    got = EdgeModel.load(art).predict(x)
    assert list(got) == list(expected)
    for name, value in got.items():
        assert value.shape == expected[name].shape and value.dtype == expected[name].dtype, name
        np.testing.assert_allclose(value, expected[name], rtol=1e-4, atol=1e-4, err_msg=name)
    return json.loads((art / "manifest.json").read_text())


def _client():
    with warnings.catch_warnings():  # starlette asks for httpx2, which is not needed here
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    return TestClient


@pytest.mark.slow
def test_regression_trains_evaluates_predicts_registers_and_serves(tmp_path, capsys):
    lake, workdir = tmp_path / "lake", tmp_path / "run"
    assert main(["lake", "ingest", "--lake", str(lake), "--source", "sklearn:diabetes", "--table", "diabetes"]) == 0
    table = Lake(lake).table("diabetes")
    assert table.schema["target_arrays"] == ["target"]
    assert table.schema["arrays"]["target"]["dtype"] == "float32"
    assert table.schema["arrays"]["target"]["example_shape"] == [1]
    train_stats = table.record["stats"]["splits"]["train"]["target"]["columns"]
    assert main(["train", "--config", str(ROOT / "configs" / "diabetes_mlp.py"), "--workdir", str(workdir),
                 "--lake", str(lake), "--no-progress", "--config.num_epochs=3"]) == 0
    run_schema = json.loads((workdir / "run.json").read_text())["data"]["schema"]
    assert run_schema["target_stats"]["mean"] == train_stats["mean"]  # the train split's, recorded with the run
    summary = json.loads((workdir / "summary.json").read_text())
    assert {"test_rmse", "test_mae", "test_r2", "test_loss", "best_dev_rmse"} <= set(summary)
    assert not (workdir / "confusion_matrix.png").exists()
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("dev_rmse" in m for m in metrics) and any("train_mae" in m or "mae" in m for m in metrics)
    capsys.readouterr()

    assert main(["eval", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "rmse" in out and "R²" in out

    test = table.reader("test").read_all()
    x = test[input_array(table.schema)][:3]
    np.save(tmp_path / "x.npy", x)
    assert main(["predict", "--workdir", str(workdir), "--input", str(tmp_path / "x.npy"), "--output",
                 str(tmp_path / "pred.npy")]) == 0
    values = np.load(tmp_path / "pred.npy")
    assert values.shape == (3, 1) and values.dtype == np.float32
    y = load_diabetes().target
    assert y.min() - 100 < values.min() and values.max() < y.max() + 100  # target units, not standardised ones

    assert main(["registry", "register", "--lake", str(lake), "--name", "diab", "--workdir", str(workdir),
                 "--promote", "production"]) == 0
    assert Registry(lake).get("diab", 1).record["data"]["schema"]["target_stats"] == run_schema["target_stats"]
    served = ServedModel.from_registry(lake, "diab@production")
    assert [o["name"] for o in served.metadata()["outputs"]] == ["value"]
    server = ModelServer([served], ServeConfig(warm_up_on_startup=False, replicas=1, max_batch_size=4))
    server.warm_up()
    with _client()(server.app) as client:
        response = client.post("/v2/models/diab/infer", json=infer_request(x, input_array(table.schema)))
    assert response.status_code == 200, response.text
    (tensor,) = response.json()["outputs"]
    assert tensor["name"] == "value" and tensor["shape"] == [3, 1]
    np.testing.assert_allclose(np.asarray(tensor["data"], np.float32).reshape(3, 1), values, rtol=1e-4, atol=1e-3)

    manifest = _export_round_trip(tmp_path, workdir, x, "--lake", str(lake), "--model", "diab@production")
    assert [o["op"] for o in manifest["task"]["outputs"]] == ["affine"]
    ev = manifest["evaluation"]  # the artifact on the test split: the float model's RMSE, values within 1e-3
    assert abs(ev["artifact_metrics"]["rmse"] - ev["float_metrics"]["rmse"]) < 1e-3
    assert ev["max_abs_difference"]["value"] < 1e-3
    capsys.readouterr()
    assert main(["robust-eval", "--workdir", str(workdir), "--epsilons", "0.05"]) == 2
    assert "attacks classifiers only" in capsys.readouterr().err


CUSTOM_TASK = '''
"""A task outside lepton_jax: label-smoothed cross-entropy, with balanced accuracy as an extra metric."""
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.metrics import balanced_accuracy_score

from lepton_jax.tasks import Task


class Smoothed(Task):
    name = "smoothed"
    output_names = ("logits",)

    @property
    def output_size(self):
        return len(self.schema["label_names"])

    def loss(self, outputs, targets):
        onehot = optax.smooth_labels(jnp.eye(self.output_size)[targets], 0.1)
        return optax.softmax_cross_entropy(outputs, onehot).mean()

    def step_metric(self, outputs, targets):
        return jnp.mean(jnp.argmax(outputs, -1) == targets)

    def metrics(self, outputs, targets):
        return {"loss": float(self.loss(jnp.asarray(outputs), jnp.asarray(targets))),
                "accuracy": float(np.mean(outputs.argmax(-1) == targets)),
                "balanced_accuracy": float(balanced_accuracy_score(targets, outputs.argmax(-1)))}
'''


@pytest.mark.slow
def test_custom_task_by_import_path_trains_and_serves(lake_root, tmp_path, monkeypatch):
    from lepton_jax.train.loop import train

    (tmp_path / "mytask.py").write_text(textwrap.dedent(CUSTOM_TASK))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config(str(DEFAULT_CONFIG), ["num_epochs=3", "optim.warmup_steps=5", "optim.lr=0.01",
                                               "task.name=mytask:Smoothed", "tracking.tensorboard=False",
                                               "checkpoint.best_metric=dev_balanced_accuracy"])
    config.model = ml_collections.ConfigDict({"name": "mlp", "hidden": (16,), "dropout": 0.0, "dtype": "float32"})
    workdir = tmp_path / "run"
    result = train(config, workdir, lake_root=lake_root, progress=False)
    assert 0.5 < result["test_balanced_accuracy"] <= 1.0  # 3 epochs of an MLP on digits: far above chance (0.1)
    assert json.loads((workdir / "config.json").read_text())["task"]["name"] == "mytask:Smoothed"
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("dev_balanced_accuracy" in m for m in logged)

    served = ServedModel.from_workdir(workdir, name="smooth")  # rebuilt from the saved config: the import path
    assert served.task.name == "smoothed"
    table = Lake(lake_root).table("digits")
    x = table.reader("test").read_all()[input_array(table.schema)][:2]
    server = ModelServer([served], ServeConfig(warm_up_on_startup=False, replicas=1, max_batch_size=4))
    server.warm_up()
    with _client()(server.app) as client:
        response = client.post("/v2/models/smooth/infer", json=infer_request(x, input_array(table.schema)))
    assert response.status_code == 200, response.text
    (tensor,) = response.json()["outputs"]
    assert tensor["name"] == "logits" and tensor["shape"] == [2, 10]
    # export: the raw outputs by default (predictions {"output": logits}); a task whose own predictions its
    # edge_outputs() do not reproduce is refused in one error
    assert _export_round_trip(tmp_path, workdir, x)["task"]["outputs"] == [{"name": "output", "op": "identity",
                                                                            "dtype": "float32"}]
    from lepton_jax.serve.export import ExportError, _edge_outputs

    predictor = Predictor.from_workdir(workdir)
    predictor.task.predictions = lambda outputs: {"top": outputs.argmax(-1)}
    with pytest.raises(ExportError, match="do not reproduce its predictions"):
        _edge_outputs(predictor)


def test_regression_needs_a_target_array(lake_root):
    config = load_config(str(DEFAULT_CONFIG), ["task.name=regression"])
    with pytest.raises(ConfigError, match="float target array"):
        make_task(config, Lake(lake_root).table("digits").schema)
    with pytest.raises(ConfigError, match="unknown task"):
        make_task(load_config(str(DEFAULT_CONFIG), ["task.name=nosuchtask"]), {})


def test_edge_and_adversarial_training_refuse_other_tasks(lake_root):
    from lepton_jax.train.choose import make_strategy
    from lepton_jax.train.step import build_train_step

    config = load_config(str(DEFAULT_CONFIG), ["task.name=regression", "edge.nodes=2"])
    with pytest.raises(ConfigError, match="edge training .* trains classifiers only"):
        make_strategy(config, {}, None)
    config = load_config(str(DEFAULT_CONFIG), ["robust.objective=pgd"])

    class Other:
        name = "regression"
    with pytest.raises(ConfigError, match="trains classifiers only"):
        build_train_step(config, None, None, task=Other())


@pytest.mark.slow
def test_multilabel_trains_evaluates_predicts_registers_and_serves(tmp_path, capsys):
    lake, workdir = tmp_path / "lake", tmp_path / "run"
    assert main(["lake", "ingest", "--lake", str(lake), "--source", "sklearn:digits_attributes", "--table",
                 "digits_attributes"]) == 0
    table = Lake(lake).table("digits_attributes")
    assert table.schema["arrays"]["target"]["columns"] == ["even", "at_least_5", "prime"]
    assert main(["train", "--config", str(ROOT / "configs" / "digits_multilabel.py"), "--workdir", str(workdir),
                 "--lake", str(lake), "--no-progress", "--config.num_epochs=2", "--config.model.features=(8,)",
                 "--config.model.hidden=16"]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert {"test_micro_f1", "test_macro_f1", "test_map", "best_dev_micro_f1"} <= set(summary)
    assert summary["test_map"] > 0.6  # three balanced-ish attributes: chance mAP is about their base rates
    capsys.readouterr()
    assert main(["eval", "--workdir", str(workdir)]) == 0
    assert "micro-F1" in capsys.readouterr().out
    x = table.reader("test").read_all()[input_array(table.schema)][:3]
    np.save(tmp_path / "x.npy", x)
    assert main(["predict", "--workdir", str(workdir), "--input", str(tmp_path / "x.npy"), "--output",
                 str(tmp_path / "pred.npy")]) == 0
    probabilities = np.load(tmp_path / "pred.npy")
    assert probabilities.shape == (3, 3) and ((probabilities >= 0) & (probabilities <= 1)).all()
    assert main(["registry", "register", "--lake", str(lake), "--name", "attrs", "--workdir", str(workdir)]) == 0
    server = ModelServer([ServedModel.from_registry(lake, "attrs@1")],
                         ServeConfig(warm_up_on_startup=False, replicas=1, max_batch_size=4))
    server.warm_up()
    with _client()(server.app) as client:
        response = client.post("/v2/models/attrs/infer", json=infer_request(x, input_array(table.schema)))
    assert response.status_code == 200, response.text
    (tensor,) = response.json()["outputs"]
    assert tensor["name"] == "probabilities" and tensor["shape"] == [3, 3]
    server.lifecycle.deployments["attrs"].drift.update()  # the served batch in the drift window: inputs only
    assert server.lifecycle.deployments["attrs"].drift.num_examples == 3
    np.testing.assert_allclose(np.asarray(tensor["data"], np.float32).reshape(3, 3), probabilities, atol=1e-5)
    manifest = _export_round_trip(tmp_path, workdir, x)
    assert manifest["evaluation"]["agreement"]["labels"] == 1.0


@pytest.mark.slow
def test_dense_target_trains_evaluates_predicts_registers_and_serves(tmp_path, capsys):
    lake, workdir = tmp_path / "lake", tmp_path / "run"
    assert main(["lake", "ingest", "--lake", str(lake), "--source", "sklearn:digits_strokes", "--table",
                 "digits_strokes"]) == 0
    table = Lake(lake).table("digits_strokes")
    assert table.schema["arrays"]["target"]["example_shape"] == [8, 8]
    assert main(["train", "--config", str(ROOT / "configs" / "digits_strokes_fcn.py"), "--workdir", str(workdir),
                 "--lake", str(lake), "--no-progress", "--config.num_epochs=3", "--config.optim.lr=0.01",
                 "--config.optim.warmup_steps=5"]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["test_mean_iou"] > 0.5 and summary["test_pixel_accuracy"] > 0.7  # all-background: IoU 0.38
    capsys.readouterr()
    assert main(["eval", "--workdir", str(workdir)]) == 0
    assert "mean IoU" in capsys.readouterr().out
    test = table.reader("test").read_all()
    x = test[input_array(table.schema)][:3]
    np.save(tmp_path / "x.npy", x)
    assert main(["predict", "--workdir", str(workdir), "--input", str(tmp_path / "x.npy"), "--output",
                 str(tmp_path / "mask.npy")]) == 0
    mask = np.load(tmp_path / "mask.npy")
    assert mask.shape == (3, 8, 8) and set(np.unique(mask)) <= {0, 1}
    assert main(["registry", "register", "--lake", str(lake), "--name", "strokes", "--workdir", str(workdir)]) == 0
    served = ServedModel.from_registry(lake, "strokes@1")
    assert served.metadata()["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 8, 8, 2]}]
    server = ModelServer([served], ServeConfig(warm_up_on_startup=False, replicas=1, max_batch_size=4))
    server.warm_up()
    with _client()(server.app) as client:
        response = client.post("/v2/models/strokes/infer", json=infer_request(x, input_array(table.schema)))
    assert response.status_code == 200, response.text
    (tensor,) = response.json()["outputs"]
    assert tensor["shape"] == [3, 8, 8, 2]
    np.testing.assert_array_equal(np.asarray(tensor["data"], np.float32).reshape(3, 8, 8, 2).argmax(-1), mask)
    manifest = _export_round_trip(tmp_path, workdir, x, "--lake", str(lake), "--model", "strokes@1")
    assert manifest["output"]["shape"] == ["batch", 8, 8, 2] and manifest["evaluation"]["agreement"]["mask"] == 1.0


def test_a_task_missing_a_required_method_names_it():
    class Half(Task):
        name = "half"

    task = Half({"arrays": {}})
    with pytest.raises(NotImplementedError, match="task 'half' .*does not define 'loss'"):
        task.loss(None, None)
    with pytest.raises(NotImplementedError, match="'output_size'"):
        task.output_shape  # noqa: B018 (the default output_shape reads output_size)
