"""Experiment tracking across runs: list run directories, compare their configs and results, plot curves, and
load them as one tidy table (:func:`dataframe`: a pandas DataFrame when pandas is installed, else a list of dicts)."""

from __future__ import annotations

import os
from collections.abc import Iterable
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


def run_names(workdirs: Iterable[str | Path]) -> list[str]:
    """Names that tell runs apart: each run directory relative to the runs' common folder (``sweep/lr=0.01``), or the
    directory's own name for a single run (never a bare ``run`` for ``a/run`` and ``b/run``)."""
    paths = [Path(w).resolve() for w in workdirs]
    if len(paths) < 2:
        return [p.name for p in paths]
    common = Path(os.path.commonpath(paths))
    return [str(p.relative_to(common)) if p != common else p.name for p in paths]


def layout(processes: int | None, devices: int | None) -> str:
    """``"2 processes × 4 devices"``: processes, and devices per process (``devices`` counts all processes')."""
    if not processes or not devices:
        return "?"
    per = devices // processes
    return f"{processes} process{'es' if processes > 1 else ''} × {per} device{'s' if per > 1 else ''}"


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
            "layout": layout(processes, devices),
            "git": (info.get("git_revision") or "?")[:12], "steps": steps,
            "best_dev_accuracy": max(dev) if dev else None, "test_accuracy": final.get("test_accuracy"),
            "finished": bool(info.get("finished"))}


def config_differences(summaries: list[dict[str, Any]]) -> list[str]:
    """Config keys whose values differ between the runs."""
    keys = set().union(*(s["config"] for s in summaries))
    return sorted(k for k in keys if len({repr(s["config"].get(k)) for s in summaries}) > 1)


def table(summaries: list[dict[str, Any]], extra_keys: Iterable[str] = (), *, max_keys: int = 6,
          width: int = 18) -> str:
    """A markdown table of runs: name (:func:`run_names`), the ``extra_keys`` config values (headed by their shortest
    unambiguous suffix, ``lr`` for ``optim.lr``), data version, layout (processes × devices per process), git revision
    and results, in aligned columns. Columns every run shares move to one line above the table, config values longer
    than ``width`` (names: twice that) are cut with "…", and keys past ``max_keys`` are listed below it, so the table
    stays readable at 20+ runs."""
    keys = list(extra_keys)
    shown, hidden = keys[:max_keys], keys[max_keys:]
    names = run_names(s["run"] for s in summaries)
    columns = {**{header: [_value(s["config"].get(k)) for s in summaries]
                  for header, k in zip(_short_keys(shown), shown, strict=True)},
               "data": [s["data"] for s in summaries], "layout": [s["layout"] for s in summaries],
               "git": [s["git"] for s in summaries], "steps": [str(s["steps"]) for s in summaries],
               "best dev": [_fmt(s["best_dev_accuracy"]) for s in summaries],
               "test acc": [_fmt(s["test_accuracy"]) for s in summaries],
               "done": ["yes" if s["finished"] else "no" for s in summaries]}
    shared = {k: v[0] for k, v in columns.items()
              if k in ("data", "layout", "git") and len(set(v)) == 1 and len(summaries) > 1}
    columns = {"run": names, **{k: v for k, v in columns.items() if k not in shared}}
    header = list(columns)
    limits = {h: width for h in _short_keys(shown)} | {"run": 2 * width}  # config values and names are cut
    rows = [header, ["---"] * len(header)] + [[_cut(columns[h][i], limits.get(h, 1000)) for h in header]
                                               for i in range(len(summaries))]
    lines = ["all runs: " + ", ".join(f"{k} {v}" for k, v in shared.items()), ""] if shared else []  # (Markdown:
    # a blank line before the table)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    rows[1] = ["-" * w for w in widths]
    lines += ["| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) + " |" for r in rows]
    if hidden:
        lines.append(f"(also differ: {', '.join(hidden)})")
    return "\n".join(lines)


def dataframe(runs: str | Path | Iterable[str | Path], *, curves: bool = False) -> Any:
    """A tidy table of runs: one row per run (``run`` name, ``path``, results, ``data``, ``layout``, ``git``, and
    every config key as ``config.<key>``), or with ``curves`` one row per logged metric value (``run``, ``step``,
    ``kind``, ``metric``, ``value``) from each run's metrics.jsonl. ``runs``: a folder holding run directories, or the
    directories. A ``pandas.DataFrame`` when pandas is installed, else the same rows as a list of dicts (pandas is
    not a requirement)."""
    workdirs = find_runs(runs) if isinstance(runs, str | Path) else [Path(w) for w in runs]
    names = run_names(workdirs)
    rows: list[dict[str, Any]] = []
    for name, workdir in zip(names, workdirs, strict=True):
        if curves:
            for record in tracking.read_metrics(workdir):
                step, kind = record.get("step"), record.get("kind")
                rows += [{"run": name, "step": step, "kind": kind, "metric": k, "value": v}
                         for k, v in record.items() if k not in ("step", "kind") and isinstance(v, int | float)
                         and not isinstance(v, bool)]
            continue
        s = run_summary(workdir)
        rows.append({"run": name, "path": s["run"], "best_dev_accuracy": s["best_dev_accuracy"],
                     "test_accuracy": s["test_accuracy"], "steps": s["steps"], "finished": s["finished"],
                     "data": s["data"], "layout": s["layout"], "git": s["git"],
                     **{f"config.{k}": v for k, v in s["config"].items()}})
    try:
        import pandas
    except ImportError:
        return rows
    return pandas.DataFrame(rows)


def plot_curves(workdirs: list[Path], path: Path | None = None) -> Any:
    """Training loss and dev accuracy against step for several runs, labelled by :func:`run_names`; returns the
    matplotlib ``Figure`` (shown inline in a notebook) and, with ``path``, also writes it as a PNG atomically."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    loss_ax, dev_ax = fig.subplots(1, 2)
    for name, workdir in zip(run_names(workdirs), workdirs, strict=True):
        metrics = tracking.read_metrics(workdir)
        train = [(m["step"], m["train_loss"]) for m in metrics if m.get("train_loss") is not None]
        dev = [(m["step"], m["dev_accuracy"]) for m in metrics if m.get("dev_accuracy") is not None]
        if train:
            loss_ax.plot(*zip(*train, strict=True), label=name)
        if dev:
            dev_ax.plot(*zip(*dev, strict=True), marker="o", label=name)
    loss_ax.set(xlabel="step", ylabel="train loss", yscale="log", title="training loss")
    dev_ax.set(xlabel="step", ylabel="dev accuracy", title="dev accuracy")
    for ax in (loss_ax, dev_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        tracking.save_figure_atomic(fig, Path(path), dpi=110)
    return fig


def _short_keys(keys: list[str]) -> list[str]:
    """The shortest dotted suffix of each key that no other key ends with (``optim.lr`` -> ``lr``)."""
    out = []
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out.append(suffix)
    return out


def _value(value: Any) -> str:
    """A config value for a table cell: floats with 6 significant digits (0.21, not 0.21000000000000002)."""
    return f"{value:.6g}" if isinstance(value, float) else repr(value)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
