"""Edge artifacts: a jax.export round trip in a process without lepton_jax, int8 size and agreement, bad inputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lepton_jax.cli import main
from lepton_jax.lake import Lake
from lepton_jax.serve import Predictor
from lepton_jax.serve.edge import ArtifactError, EdgeModel
from lepton_jax.serve.export import ExportError, artifact_size, export_artifact

RUNNER = """
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from edge_runner import EdgeModel
model = EdgeModel.load(sys.argv[1])
x = np.load(sys.argv[2])
out = {f"logits_{n}": model.logits(x[:n]) for n in (1, 7, 64, x.shape[0])}
banned = sorted(m for m in sys.modules if m.split(".")[0] in ("lepton_jax", "flax", "optax", "orbax"))
assert not banned, banned
np.savez(sys.argv[3], **out)
"""


@pytest.fixture(scope="module")
def artifacts(trained_run, tmp_path_factory):
    workdir, _ = trained_run
    root = tmp_path_factory.mktemp("artifacts")
    float_manifest = export_artifact(workdir, root / "float")
    assert main(["export", "--workdir", str(workdir), "--output", str(root / "int8"), "--int8"]) == 0
    return root, float_manifest, json.loads((root / "int8" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def test_split(trained_run):
    workdir, _ = trained_run
    data = json.loads((workdir / "run.json").read_text())["data"]
    return Lake(data["lake"]).table(data["table"], data["version"]).reader("test").read_all()


def test_round_trip_in_a_process_without_lepton_jax(artifacts, trained_run, test_split, tmp_path):
    root, manifest, _ = artifacts
    assert set(manifest["platforms"]) == {"cpu", "cuda"} and manifest["input"]["example_shape"] == [8, 8, 1]
    raw = test_split["image"][:100]
    np.save(tmp_path / "x.npy", raw)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(root / "float"), str(tmp_path / "x.npy"),
                           str(tmp_path / "out.npz")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = Predictor.from_workdir(trained_run[0]).logits(raw)
    with np.load(tmp_path / "out.npz") as out:
        for n in (1, 7, 64, 100):
            got = out[f"logits_{n}"]
            assert got.shape == (n, 10)
            np.testing.assert_allclose(got, expected[:n], rtol=1e-4, atol=1e-4)
            assert (got.argmax(-1) == expected[:n].argmax(-1)).all()


def test_int8_is_smaller_and_agrees(artifacts, trained_run, test_split):
    root, float_manifest, int8_manifest = artifacts
    ratio = artifact_size(root / "float") / artifact_size(root / "int8")
    assert ratio >= 3.5, ratio
    evaluation = int8_manifest["evaluation"]
    assert evaluation["split"] == "test" and evaluation["num_examples"] == 271
    assert evaluation["top1_agreement"] >= 0.99
    # recompute independently: the int8 artifact against the float predictor on the whole test split
    reference = Predictor.from_workdir(trained_run[0]).predict(test_split["image"])["class"]
    got = EdgeModel.load(root / "int8").predict(test_split["image"])["class"]
    assert np.mean(got == reference) >= 0.99
    assert abs(evaluation["artifact_accuracy"] - np.mean(got == test_split["label"])) < 1e-9
    params = int8_manifest["quantization"]["params"]
    assert {p["quantized"] for p in params if len(p["shape"]) >= 2} == {"int8"}


def test_artifact_checks_inputs_and_integrity(artifacts, tmp_path):
    root, _, _ = artifacts
    model = EdgeModel.load(root / "float")
    for bad, message in [(np.zeros((2, 4, 8)), "expected \\(N, 8, 8, 1\\)"), (np.array([["a"]]), "not numeric"),
                         (np.full((1, 8, 8), np.nan), "NaN or inf"),
                         (np.full((1, 8, 8), 99.0), "expected \\[0.0, 16.0\\]")]:
        with pytest.raises(ArtifactError, match=message):
            model.predict(bad)
    assert model.predict(np.zeros((0, 8, 8)))["class"].shape == (0,)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(root / "float", broken)
    data = bytearray((broken / "weights.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "weights.npz").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        EdgeModel.load(broken)
    # the runner's command line: a missing examples file or a broken artifact is one line, exit 2
    runner = [sys.executable, str(root / "float" / "edge_runner.py")]
    for argv, message in [([str(root / "float"), str(tmp_path / "missing.npy")], "No such file"),
                          ([str(broken), str(tmp_path / "missing.npy")], "does not match the sha256")]:
        proc = subprocess.run([*runner, *argv], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
            proc.stderr[-2000:]
    with pytest.raises(ExportError, match="not empty"):
        export_artifact(root, root / "float")
