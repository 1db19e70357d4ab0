"""Plug-ins by import path: a model and a lake source defined outside the package (a module on sys.path) go through
every command that rebuilds the model, and bad import paths give one clear line."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from lepton_jax.cli import main
from lepton_jax.data.transforms import input_array
from lepton_jax.errors import ConfigError
from lepton_jax.lake import Lake
from lepton_jax.models import build_model, register_model
from lepton_jax.serve.client import infer_request
from lepton_jax.serve.registry import Registry
from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel
from tests.conftest import ROOT

PLUGIN = '''
"""A model and a source that live outside lepton_jax."""
import jax
import jax.numpy as jnp
from flax import nnx

from lepton_jax.lake.sources import SklearnSource


class Tiny(nnx.Module):
    def __init__(self, *, input_shape, num_classes, width, rngs):
        size = 1
        for d in input_shape:
            size *= int(d)
        self.hidden = nnx.Linear(size, width, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x, *, train=False, rngs=None):
        return self.head(jnp.tanh(self.hidden(x.reshape(x.shape[0], -1).astype(jnp.float32))))


class Digits(SklearnSource):
    def __init__(self):
        super().__init__("digits")
'''

CONFIG = f'''
from lepton_jax.config import load_config
import ml_collections


def get_config():
    config = load_config({str(ROOT / "configs" / "digits_cnn.py")!r})
    config.num_epochs = 1
    config.data.table = "mydigits"
    config.model = ml_collections.ConfigDict({{"name": "plugmod:Tiny", "width": 16}})
    return config
'''


@pytest.mark.slow
def test_custom_model_and_source_through_every_command(tmp_path, monkeypatch, capsys):
    with warnings.catch_warnings():  # starlette asks for httpx2, which is not needed here
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    (tmp_path / "plugmod.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "plug_config.py").write_text(CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path))
    lake, workdir = tmp_path / "lake", tmp_path / "run"

    assert main(["lake", "ingest", "--lake", str(lake), "--source", "plugmod:Digits", "--table", "mydigits"]) == 0
    assert main(["train", "--config", str(tmp_path / "plug_config.py"), "--workdir", str(workdir), "--lake",
                 str(lake), "--no-progress"]) == 0
    assert json.loads((workdir / "config.json").read_text())["model"]["name"] == "plugmod:Tiny"  # recorded
    capsys.readouterr()

    assert main(["eval", "--workdir", str(workdir)]) == 0
    assert "accuracy" in capsys.readouterr().out
    table = Lake(lake).table("mydigits")
    assert table.record["lineage"]["source"]["name"] == "plugmod:Digits"  # recorded with the table
    x = np.asarray(table.reader("test").read_all()[input_array(table.schema)][:3], np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["predict", "--workdir", str(workdir), "--input", str(tmp_path / "x.npy"), "--output",
                 str(tmp_path / "pred.npy")]) == 0
    assert np.load(tmp_path / "pred.npy").shape == (3,)
    assert main(["robust-eval", "--workdir", str(workdir), "--epsilons", "0.05", "--steps", "2", "--restarts", "1",
                 "--curve", "0", "0.05", "--batch-size", "64", "--surrogate", str(workdir), "--square", "20"]) == 0
    robust = json.loads((workdir / "robust" / "robust.json").read_text())
    assert robust["surrogates"][0]["workdir"] == str(workdir)
    accuracy = robust["results"]["0.05"]["accuracy"]  # its own surrogate: the transfer attack is white-box PGD-2
    assert accuracy["transfer"] == accuracy["pgd2"] and accuracy["worst"] <= min(accuracy["pgd2"], accuracy["square"])
    assert main(["registry", "register", "--lake", str(lake), "--name", "tiny", "--workdir", str(workdir),
                 "--promote", "production"]) == 0
    assert Registry(lake).get("tiny", 1).record["model"]["plugin"] == "plugmod:Tiny"
    shutil.rmtree(workdir)  # the registry record and the lake are enough from here on
    server = ModelServer([ServedModel.from_registry(lake, "tiny@production")],
                         ServeConfig(warm_up_on_startup=False, replicas=1, max_batch_size=4))
    server.warm_up()
    with TestClient(server.app) as client:
        response = client.post("/v2/models/tiny/infer", json=infer_request(x, input_array(table.schema)))
    assert response.status_code == 200, response.text
    assert np.asarray(response.json()["outputs"][0]["shape"])[0] == 3
    assert main(["export", "--lake", str(lake), "--model", "tiny@production", "--output", str(tmp_path / "art"),
                 "--platforms", "cpu"]) == 0
    assert (tmp_path / "art" / "manifest.json").exists()


def test_bad_import_paths_are_one_line_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "plugmod2.py").write_text("VALUE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, expected in (("no_such_module_xyz:Tiny", "cannot import"), ("plugmod2:Missing", "no attribute"),
                           ("plugmod2:VALUE", "not a class"), ("nosuchmodel", "unknown model")):
        with pytest.raises(ConfigError, match=expected):
            build_model(_model(name), input_shape=(4,), num_classes=3, seed=0)
    assert main(["lake", "ingest", "--lake", str(tmp_path / "l"), "--source", "plugmod2:Missing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no attribute" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "l").exists() or not any((tmp_path / "l").rglob("*.json"))


def test_register_model_for_notebooks():
    from lepton_jax.models.mlp import MLP

    register_model("my_mlp", MLP)
    model = build_model(_model("my_mlp", hidden=(8,)), input_shape=(4,), num_classes=3, seed=0)
    assert model.head.out_features == 3
    with pytest.raises(ConfigError, match="plain identifier"):
        register_model("pkg.mod:X", MLP)


def _model(name, **kwargs):
    import ml_collections

    return ml_collections.ConfigDict({"name": name, **kwargs})


MINIMAL_SOURCE = '''
import numpy as np

from lepton_jax.lake.sources import SourceData


class MySource:  # what README asks of a source: load() returning SourceData (no name, no uri)
    def load(self):
        x = np.arange(40 * 4, dtype=np.uint8).reshape(40, 4)
        return SourceData({"image": x}, np.arange(40) % 2, ["a", "b"], {"image": (0.0, 255.0)}, "my://rows")


class NotASource:
    pass
'''


def test_console_script_finds_a_minimal_source_in_the_working_directory(tmp_path):
    """The installed ``lepton-jax`` command, run from the folder holding ``my_pkg`` (not on PYTHONPATH), ingests a
    source class that only has ``load()``; a class without it is one error line."""
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "data.py").write_text(MINIMAL_SOURCE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def ingest(source: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).parent / "lepton-jax"), "lake", "ingest", "--lake", "lake",
                               "--source", source, "--table", "mine"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    done = ingest("my_pkg.data:MySource")
    assert done.returncode == 0, done.stderr
    source = Lake(tmp_path / "lake").table("mine").record["lineage"]["source"]
    assert source["name"] == "my_pkg.data:MySource" and source["uri"] == "my://rows"
    bad = ingest("my_pkg.data:NotASource")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: source my_pkg.data:NotASource has neither load() nor tasks(); a source's load() returns "
        "lepton_jax.lake.sources.SourceData (or tasks() returns objects that do)"]


MINIMAL_MODEL = '''
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):  # declares none of the base config's model keys (features, hidden, dropout, dtype)
    def __init__(self, input_shape, num_classes, rngs):
        size = 1
        for d in input_shape:
            size *= int(d)
        self.head = nnx.Linear(size, num_classes, rngs=rngs)

    def __call__(self, x, *, train=False, rngs=None):
        return self.head(x.reshape(x.shape[0], -1).astype(jnp.float32))


class Flexible(Linear):
    def __init__(self, input_shape, num_classes, rngs, **rest):
        super().__init__(input_shape, num_classes, rngs)
        self.rest = dict(rest)
'''


@pytest.mark.slow
def test_a_model_taking_only_shape_classes_and_rngs_trains_with_the_base_config(lake_root, tmp_path, monkeypatch,
                                                                                capsys):
    """Issue 28: the base config's model keys a plug-in does not declare are left out (it failed with "rejected its
    config {dropout, dtype, features, hidden}" before); a **kwargs model still gets them all, and a key that is not
    the base config's still fails."""
    (tmp_path / "plugmin.py").write_text(MINIMAL_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["train", "--config", "digits_cnn", "--workdir", str(tmp_path / "run"), "--lake", str(lake_root),
                 "--no-progress", "--config.model.name=plugmin:Linear", "--config.num_epochs=1",
                 "--config.optim.warmup_steps=0", "--config.optim.lr=0.05",
                 "--config.tracking.tensorboard=False"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["test_accuracy"] > 0.5
    base = {"features": (32, 64), "hidden": 128, "dropout": 0.25, "dtype": "float32"}
    flexible = build_model(_model("plugmin:Flexible", **base), input_shape=(4,), num_classes=3, seed=0)
    assert set(flexible.rest) == set(base)
    with pytest.raises(ConfigError, match="rejected its config.*widht"):
        build_model(_model("plugmin:Linear", widht=3, **base), input_shape=(4,), num_classes=3, seed=0)
