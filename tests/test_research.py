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
    assert len(summary) == 4 and "optim.lr" in summary[0]  # header, rule, one row per point
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
