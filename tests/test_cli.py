"""The CLI end to end: happy paths, and every bad input giving one clear error line, exit 2, nothing written."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from lepton_jax.cli import main
from lepton_jax.lake import Lake
from tests.conftest import DEFAULT_CONFIG


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_lake_ingest_and_ls(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "lake", "ingest", "--lake", tmp_path, "--source", "digits", "--table", "digits")
    assert code == 0 and "committed" in out and "version 1" in out
    code, out, _ = run_cli(capsys, "lake", "ingest", "--lake", tmp_path, "--source", "digits", "--table", "digits")
    assert code == 0 and out.startswith("unchanged")
    code, out, _ = run_cli(capsys, "lake", "ls", "--lake", tmp_path)
    assert code == 0 and "digits@1  dev=269, test=271, train=1257  labels=10" in out


def test_lake_ingest_row_hash_flag(capsys, tmp_path):
    code, _, err = run_cli(capsys, "lake", "ingest", "--lake", tmp_path, "--source", "digits", "--table", "safe",
                           "--row-hash", "sha256")
    assert code == 0, err
    frags = Lake(tmp_path).table("safe").fragments("train")
    assert {f["row_hashes"]["hash"] for f in frags} == {"sha256"}
    assert "identifies rows by sha256; an append must keep it" in _bad(
        capsys, "lake", "ingest", "--lake", tmp_path, "--source", "digits", "--table", "safe", "--mode", "append",
        "--row-hash", "xxh3_128")
    assert Lake(tmp_path).versions("safe") == [1]


def test_predict_and_eval_on_a_trained_run(capsys, trained_run, tmp_path):
    workdir, result = trained_run
    digits = load_digits()
    np.save(tmp_path / "x.npy", digits.images[:40])  # raw (N, 8, 8) values 0..16, no channel axis
    code, out, err = run_cli(capsys, "predict", "--workdir", workdir, "--input", tmp_path / "x.npy",
                             "--output", tmp_path / "pred.npy")
    assert code == 0, err
    predicted = np.load(tmp_path / "pred.npy")
    assert predicted.shape == (40,) and np.mean(predicted == digits.target[:40]) > 0.8
    assert "predicted 40 example(s)" in out
    code, out, err = run_cli(capsys, "eval", "--workdir", workdir)
    assert code == 0, err
    assert f"accuracy {result['test_accuracy']:.4f}" in out


def _bad(capsys, *argv):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_bad_config_inputs_write_nothing(capsys, tmp_path, lake_root):
    workdir = tmp_path / "w"
    base = ("train", "--config", DEFAULT_CONFIG, "--workdir", workdir, "--lake", lake_root)
    assert "unknown config key 'optim.lrr'" in _bad(capsys, *base, "--config.optim.lrr=1")
    assert "optim.lr='fast': expected float" in _bad(capsys, *base, "--config.optim.lr=fast")
    assert "config file" in _bad(capsys, "train", "--config", tmp_path / "x.py", "--workdir", workdir)
    assert f"lake {tmp_path / 'no-lake'} does not exist" in _bad(capsys, "train", "--config", DEFAULT_CONFIG,
                                                                 "--workdir", workdir, "--lake", tmp_path / "no-lake")
    assert "mesh.axes {'data': 3}" in _bad(capsys, *base, "--config.mesh.axes={'data': 3}")
    assert not workdir.exists()


def test_bad_prediction_inputs(capsys, trained_run, tmp_path):
    workdir, _ = trained_run
    cases = {
        "shape.npy": (np.zeros((3, 4, 8)), "shape (3, 4, 8) does not match the model's input; expected (N, 8, 8, 1)"),
        "dtype.npy": (np.array([["a"]]), "dtype <U1 is not numeric"),
        "nan.npy": (np.full((2, 8, 8), np.nan), "2 example(s) contain NaN or inf"),
        "range.npy": (np.full((1, 8, 8), 255.0), "values span [255.0, 255.0] but the model was trained on [0.0, 16.0]"),
    }
    for name, (array, message) in cases.items():
        np.save(tmp_path / name, array)
        out = tmp_path / f"{name}.out.npy"
        line = _bad(capsys, "predict", "--workdir", workdir, "--input", tmp_path / name, "--output", out)
        assert message in line and name in line
        assert not out.exists()
    (tmp_path / "text.npy").write_text("not numpy")
    assert "is not a .npy file" in _bad(capsys, "predict", "--workdir", workdir, "--input", tmp_path / "text.npy")
    assert "does not exist" in _bad(capsys, "predict", "--workdir", workdir, "--input", tmp_path / "none.npy")
    np.save(tmp_path / "ok.npy", np.zeros((1, 8, 8)))
    assert "is not a training run directory" in _bad(capsys, "predict", "--workdir", tmp_path, "--input",
                                                     tmp_path / "ok.npy")


def test_corrupt_or_missing_checkpoint(capsys, trained_run, tmp_path):
    import shutil

    workdir, result = trained_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    np.save(tmp_path / "ok.npy", np.zeros((1, 8, 8)))
    step_dir = copy / "checkpoints" / str(result["best_step"])
    for blob in (step_dir / "params" / "ocdbt.process_0" / "d").iterdir():  # array data, not the metadata
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    line = _bad(capsys, "predict", "--workdir", copy, "--input", tmp_path / "ok.npy")
    assert f"checkpoint {step_dir} " in line and "corrupt" in line
    shutil.rmtree(copy / "checkpoints")
    assert "checkpoint directory" in _bad(capsys, "predict", "--workdir", copy, "--input", tmp_path / "ok.npy")


@pytest.mark.parametrize("argv", [["predict", "--workdir", "w", "--input", "x", "--config.seed=1"]])
def test_overrides_outside_train_are_rejected(capsys, argv):
    assert "apply to `train` only" in _bad(capsys, *argv)


def test_lake_ls_of_missing_table(capsys, lake_root):
    assert "has no table 'nope'" in _bad(capsys, "lake", "ls", "--lake", lake_root, "--table", "nope")
    assert Lake(lake_root).versions("digits") == [1]


def test_a_missing_lake_is_named_as_missing(capsys, tmp_path):
    """Reading commands pointed at a lake that does not exist say so (not 'no tables' or 'no stage'), exit 2."""
    missing = tmp_path / "no-lake"
    for argv in (("lake", "ls"), ("lake", "show", "--table", "t"), ("registry", "ls"),
                 ("registry", "show", "digits@production"), ("serve", "--model", "digits@production")):
        line = _bad(capsys, *argv, "--lake", missing)
        assert line.startswith(f"error: lake {missing} does not exist"), (argv, line)
    assert not missing.exists()


def test_python_dash_m_runs_the_cli_and_reports_the_installed_version():
    import subprocess
    import sys
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "lepton_jax", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"lepton-jax {version('lepton_jax')}"


@pytest.mark.parametrize("argv", [["scripts/comm_table.py", "--config", "configs/digits_resnt.py"],
                                  ["scripts/check_numbers.py", "--only", "defualt"]])
def test_scripts_report_input_errors_as_one_line(argv):
    """Scripts run their main like the CLI runs a command (lepton_jax.cli.run_script): one error line, exit 2."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]


def test_train_help_documents_config_overrides_with_examples_that_apply(capsys):
    """Issue 28: `train --help` says how --config.* overrides work; its examples are valid overrides of the base
    config."""
    import re
    import shlex

    from lepton_jax.config import load_config, split_override_args

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--config.KEY=VALUE" in text and "base config" in text
    examples = [arg for line in text.splitlines() if re.match(r"\s*--config\.[a-z]", line)
                for arg in shlex.split(line)]
    assert len(examples) >= 4
    _, overrides = split_override_args(examples)
    config = load_config("digits_cnn", overrides)
    assert config.optim.lr == 3e-4 and config.augment == (("random_shift", {"max_shift": 1}),)


def test_serve_on_a_busy_port_is_one_line_before_loading_anything(tmp_path, capsys):
    """Issue 28: a port another socket listens on is refused first (exit 2, one line), before the lake or any model
    is opened (it printed uvicorn logs and exited 3 after loading); a free port goes on to load (here: no lake)."""
    import socket

    lake = tmp_path / "no_lake"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--lake", str(lake), "--model", "digits@production", "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [err] and f"cannot listen on 127.0.0.1:{port}" in err and "free --port" in err
    assert not lake.exists()
    assert main(["serve", "--lake", str(lake), "--model", "digits@production", "--port", str(port)]) == 2
    assert "cannot listen" not in capsys.readouterr().err  # free now: it got as far as the (missing) registry
