"""Sweeps and run comparison from the CLI."""

import json

import pytest

from lepton_jax.cli import main
from tests.conftest import ROOT


@pytest.mark.slow
def test_two_point_sweep_then_compare(capsys, lake_root, tmp_path, monkeypatch):
    config = tmp_path / "sweep.py"
    config.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('base', {str(ROOT / 'configs' / 'digits_cnn.py')!r})\n"
        "base = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(base)\n"
        "get_config = base.get_config\n"
        "def get_sweep():\n    return {'list': [{'optim.lr': 0.003}, {'optim.lr': 0.0003}]}\n")
    sweep_dir = tmp_path / "sweep"
    assert main(["sweep", "--config", str(config), "--workdir", str(sweep_dir), "--lake", str(lake_root),
                 "--no-progress", "--config.num_epochs=1"]) == 0
    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert runs == ["optim.lr=0.0003", "optim.lr=0.003"]
    summary = (sweep_dir / "summary.md").read_text().splitlines()
    # shared columns, a blank line (Markdown), header, rule, rows
    assert len(summary) == 6 and summary[0].startswith("all runs: data digits@") and summary[1] == ""
    assert [c.strip() for c in summary[2].split("|")[1:3]] == ["run", "lr"] and "optim.lr=0.0003" in summary[5]
    rows = json.loads((sweep_dir / "summary.json").read_text())
    assert all(r["finished"] and r["test_accuracy"] > 0.1 for r in rows)
    capsys.readouterr()

    plot = tmp_path / "curves.png"
    assert main(["runs", "compare", *(str(sweep_dir / r) for r in runs), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "config differences: optim.lr"
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert main(["runs", "ls", str(sweep_dir)]) == 0
    assert "optim.lr=0.0003" in capsys.readouterr().out


def test_sweep_rejects_a_bad_point_before_training(capsys, lake_root, tmp_path):
    config = tmp_path / "bad.py"
    config.write_text(f"exec(open({str(ROOT / 'configs' / 'digits_cnn.py')!r}).read())\n"
                      "def get_sweep():\n    return {'grid': {'optim.lrr': [1.0]}}\n")
    assert main(["sweep", "--config", str(config), "--workdir", str(tmp_path / "s"), "--lake", str(lake_root)]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_library_plots_leave_the_matplotlib_backend_alone(trained_run, tmp_path):
    """A notebook's backend survives every library plot (the library draws on Figure objects, never pyplot)."""
    import matplotlib

    from lepton_jax import runs
    from lepton_jax.eval.metrics import save_confusion_matrix
    from lepton_jax.robust.evaluate import save_curve_png

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands in for a notebook's inline backend: anything but Agg
    try:
        workdir, _ = trained_run
        runs.plot_curves([workdir], tmp_path / "curves.png")
        save_confusion_matrix([[3, 1], [0, 4]], ["a", "b"], tmp_path / "cm.png")
        save_curve_png({"m": {"epsilons": [0.0, 0.1], "worst": [1.0, 0.5], "norm": "linf"}}, tmp_path / "r.png")
        assert matplotlib.get_backend() == "svg"
        assert all((tmp_path / n).read_bytes()[:4] == b"\x89PNG" for n in ("curves.png", "cm.png", "r.png"))
    finally:
        matplotlib.use(before)


def _fake_run(workdir, config, *, steps=38, dev=(0.9, 0.95), test=0.97, processes=1, devices=8, git="abc1234def567"):
    """A run directory as training leaves it (config.json, run.json, metrics.jsonl), without training."""
    import json

    from lepton_jax.config import to_dict

    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(to_dict(config)))
    (workdir / "run.json").write_text(json.dumps({"data": {"table": "digits", "version": 1}, "process_count": processes,
                                                  "devices": [f"cpu:{i}" for i in range(devices)],
                                                  "git_revision": git, "finished": True}))
    rows = [{"step": 10 * (i + 1), "kind": "train", "train_loss": 1.0 / (i + 1)} for i in range(len(dev))]
    rows += [{"step": 10 * (i + 1), "kind": "eval", "dev_accuracy": d} for i, d in enumerate(dev)]
    rows += [{"step": steps, "kind": "summary", "test_accuracy": test}]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def many_runs(tmp_path):
    """23 runs under one root, differing in 9 config keys (some long), named like sweep points."""
    from tests.conftest import small_config

    root = tmp_path / "runs"
    for i in range(23):
        config = small_config(**{"optim.lr": 10.0 ** -(1 + i % 4), "seed": i, "model.features": (16 * (i % 3 + 1),) * 4,
                                 "optim.warmup_steps": i, "batch_size": 32 + i, "num_epochs": 3 + i % 2,
                                 "model.hidden": 64 + i, "model.dropout": 0.1 + 0.01 * i,
                                 "optim.freeze": (f"convs/{i}/kernel_of_a_rather_long_parameter_name",)})
        _fake_run(root / f"sweep_{i // 12}" / f"optim.lr={config.optim.lr},seed={i}", config, test=0.9 + i / 1000)
    return root


def test_runs_ls_stays_readable_at_23_runs(many_runs, capsys):
    """Issue 28: `runs ls` over 23 runs was 552 characters wide. Shared columns move above the table, keys go by
    their short names, long values are cut, columns align, and keys past the sixth are listed below."""
    assert main(["runs", "ls", str(many_runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "all runs: data digits@1, layout 1 process × 8 devices, git abc1234def56" and lines[1] == ""
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[:4] == ["run", "batch_size", "dropout", "features"] and "test acc" in header
    assert len(lines) == 2 + 2 + 23 + 1 and lines[-1] == "(also differ: optim.lr, optim.warmup_steps, seed)"
    assert any(line.startswith("| sweep_0/optim.lr=0.1,seed=0 ") for line in lines)  # relative to the root
    assert len({len(line) for line in lines[2:-1]}) == 1  # aligned columns
    assert max(len(line) for line in lines) <= 160, max(len(line) for line in lines)


def test_runs_dataframe_and_plot_curves_name_the_runs(many_runs, tmp_path, monkeypatch):
    """`runs.dataframe`: one row per run (a DataFrame with pandas, a list of dicts without), or one row per logged
    value with curves=True; `plot_curves` returns the figure, its legends name each run by its path under the root."""
    import sys

    from lepton_jax import runs

    table = runs.dataframe(many_runs)
    rows = table.to_dict("records") if hasattr(table, "to_dict") else table
    by_name = {r["run"]: r for r in rows}
    assert len(by_name) == 23 and by_name["sweep_0/optim.lr=0.1,seed=0"]["config.seed"] == 0
    assert by_name["sweep_0/optim.lr=0.01,seed=5"]["test_accuracy"] == 0.905
    assert by_name["sweep_1/optim.lr=0.1,seed=12"]["best_dev_accuracy"] == 0.95
    monkeypatch.setitem(sys.modules, "pandas", None)  # no pandas: plain rows, the same content
    plain = runs.dataframe(many_runs)
    assert isinstance(plain, list) and [r["run"] for r in plain] == [r["run"] for r in rows]
    long = runs.dataframe(sorted(many_runs.glob("sweep_0/*"))[:2], curves=True)
    assert {r["metric"] for r in long} == {"train_loss", "dev_accuracy", "test_accuracy"} and len(long) == 10
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for workdir in (a, b):
        _fake_run(workdir, __import__("tests.conftest", fromlist=["small_config"]).small_config())
    fig = runs.plot_curves([a, b])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["a/run", "b/run"]
    assert not (tmp_path / "curves.png").exists()
    assert runs.plot_curves([a, b], tmp_path / "curves.png") is not None
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
