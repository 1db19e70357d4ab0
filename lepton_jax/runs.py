"""Experiment tracking across runs: list run directories, compare their configs and results, plot curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lepton_jax import tracking
from lepton_jax.errors import LeptonError


def find_runs(root: str | Path) -> list[Path]:
    """Run directories (holding config.json) at or below ``root``, sorted by path."""
    root = Path(root)
    if not root.exists():
        raise LeptonError(f"runs root {root} does not exist")
    found = {p.parent for p in root.rglob(tracking.CONFIG_FILE)}
    return sorted(found)


def run_summary(workdir: Path) -> dict[str, Any]:
    """Config (flattened), data version and final metrics of one run."""
    config = tracking.flatten(tracking.read_json(workdir / tracking.CONFIG_FILE))
    info = tracking.read_json(workdir / tracking.RUN_FILE) if (workdir / tracking.RUN_FILE).exists() else {}
    metrics = tracking.read_metrics(workdir)
    dev = [m["dev_accuracy"] for m in metrics if m.get("dev_accuracy") is not None]
    final = next((m for m in reversed(metrics) if "test_accuracy" in m), {})
    steps = max((m.get("step", 0) for m in metrics), default=0)
    data = info.get("data", {})
    devices, processes = len(info.get("devices", [])), info.get("process_count")
    return {"run": str(workdir), "config": config, "data": f"{data.get('table', '?')}@{data.get('version', '?')}",
            "layout": f"{devices or '?'} × {processes or '?'}",
            "git": (info.get("git_revision") or "?")[:12], "steps": steps,
            "best_dev_accuracy": max(dev) if dev else None, "test_accuracy": final.get("test_accuracy"),
            "finished": bool(info.get("finished"))}


def config_differences(summaries: list[dict[str, Any]]) -> list[str]:
    """Config keys whose values differ between the runs."""
    keys = set().union(*(s["config"] for s in summaries))
    return sorted(k for k in keys if len({repr(s["config"].get(k)) for s in summaries}) > 1)


def table(summaries: list[dict[str, Any]], extra_keys: list[str] = ()) -> str:
    """A markdown table: run, differing config values, data version, layout (devices × processes; ``devices`` counts
    all processes' devices), git revision and results."""
    header = ["run", *extra_keys, "data", "devices × processes", "git", "steps", "best dev acc", "test acc",
              "finished"]
    rows = [header, ["---"] * len(header)]
    for s in summaries:
        rows.append([Path(s["run"]).name, *(repr(s["config"].get(k)) for k in extra_keys), s["data"], s["layout"],
                     s["git"],
                     str(s["steps"]), _fmt(s["best_dev_accuracy"]), _fmt(s["test_accuracy"]),
                     "yes" if s["finished"] else "no"])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def plot_curves(workdirs: list[Path], path: Path) -> None:
    """Training loss and dev accuracy against step for several runs, as one PNG (written atomically)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    loss_ax, dev_ax = fig.subplots(1, 2)
    for workdir in workdirs:
        metrics = tracking.read_metrics(workdir)
        train = [(m["step"], m["train_loss"]) for m in metrics if m.get("train_loss") is not None]
        dev = [(m["step"], m["dev_accuracy"]) for m in metrics if m.get("dev_accuracy") is not None]
        if train:
            loss_ax.plot(*zip(*train, strict=True), label=workdir.name)
        if dev:
            dev_ax.plot(*zip(*dev, strict=True), marker="o", label=workdir.name)
    loss_ax.set(xlabel="step", ylabel="train loss", yscale="log", title="training loss")
    dev_ax.set(xlabel="step", ylabel="dev accuracy", title="dev accuracy")
    for ax in (loss_ax, dev_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tracking.save_figure_atomic(fig, path, dpi=110)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
