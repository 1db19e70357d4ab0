"""Accuracy vs. bytes communicated: synchronous data parallel vs. local SGD / DiLoCo on the embedded digits.

    .venv/bin/python scripts/edge_study.py [--out results/edge] [--lake lake] [--epochs 30] [--nodes 4]

Runs on ``--nodes`` simulated CPU devices (set before JAX starts): data parallel (configs/digits_cnn.py on a
``data`` mesh of that size) and the edge strategy (configs/edge_diloco.py) at several H, IID and non-IID (by label),
with the same inner optimizer, global batch and number of steps, plus bfloat16/int8 deltas and partial participation
(nodes that miss a sync with a probability). Bytes are collective payload bytes per device and the bytes each device
sends under the ring model (lepton_jax.parallel.comm), measured from each compiled program and multiplied by how
often it ran. Writes ``table.md``, ``results.json`` and ``accuracy_vs_bytes.png`` into ``--out``. Measured: 1,198 s
(20 minutes) at the default 30 epochs on a loaded 2-core CPU; ``--epochs 10`` for a quicker look.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lepton_jax.cli import run_script
from lepton_jax.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]

# (name, edge overrides); None = synchronous data parallel
RUNS = [
    ("data parallel", None),
    ("DiLoCo H=8", {"sync_every": 8}),
    ("DiLoCo H=32", {"sync_every": 32}),
    ("DiLoCo H=128", {"sync_every": 128}),
    ("local SGD (FedAvg) H=32", {"sync_every": 32, "outer_lr": 1.0, "outer_momentum": 0.0}),
    ("DiLoCo H=32, bf16 deltas", {"sync_every": 32, "delta_dtype": "bfloat16"}),
    ("DiLoCo H=32, non-IID", {"sync_every": 32, "split": "label"}),
    ("local SGD (FedAvg) H=32, non-IID", {"sync_every": 32, "outer_lr": 1.0, "outer_momentum": 0.0,
                                          "split": "label"}),
    ("DiLoCo H=32, int8 deltas", {"sync_every": 32, "delta_dtype": "int8"}),
    ("DiLoCo H=32, 25% miss each sync", {"sync_every": 32, "skip_prob": 0.25}),
    ("DiLoCo H=32, 50% miss each sync", {"sync_every": 32, "skip_prob": 0.5}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/edge")
    parser.add_argument("--lake", default=None, help="a lake holding the digits table (default: <out>/lake)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.nodes}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))

    from lepton_jax import tracking
    from lepton_jax.config import load_config
    from lepton_jax.lake import DigitsSource, Lake, ingest
    from lepton_jax.train.edge import dp_step_bytes
    from lepton_jax.train.loop import train, train_and_evaluate

    out = Path(args.out)
    lake_root = Path(args.lake) if args.lake else out / "lake"
    if args.lake:
        Lake(lake_root).table("digits")  # a missing lake or table is one error line, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    if not args.lake:
        ingest(Lake(lake_root), "digits", DigitsSource())  # idempotent: an identical source commits nothing
    common = [f"num_epochs={args.epochs}", f"seed={args.seed}"]
    rows = []
    for name, edge in RUNS:
        workdir = out / "runs" / name.lower().replace(" ", "_").replace("(", "").replace(")", "").replace(",", "") \
            .replace("=", "")
        if edge is None:
            config = load_config(ROOT / "configs" / "digits_cnn.py",
                                 common + [f"mesh.axes={{'data': {args.nodes}}}", f"mesh.num_devices={args.nodes}"])
            result = train_and_evaluate(config, workdir, lake_root=lake_root, progress=False)
            step_bytes = dp_step_bytes(config, example_shape=(8, 8, 1), num_classes=10,
                                       axes={"data": args.nodes})
            total = step_bytes * result["steps"]
            wire = dp_step_bytes(config, example_shape=(8, 8, 1), num_classes=10, axes={"data": args.nodes},
                                 wire=True) * result["steps"]
            h, split, skip, dtype = 1, "iid", 0.0, "float32"
        else:
            config = load_config(ROOT / "configs" / "edge_diloco.py",
                                 common + [f"edge.nodes={args.nodes}"] + [f"edge.{k}={v!r}" for k, v in edge.items()])
            result = train(config, workdir, lake_root=lake_root, progress=False)
            total, wire = result["bytes_communicated"], result["ring_wire_bytes"]
            e = config.edge
            h, split, skip, dtype = e.sync_every, e.split, e.skip_prob, e.delta_dtype
        rows.append({"run": name, "H": h, "split": split, "skip_prob": skip, "delta_dtype": dtype,
                     "test_accuracy": result["test_accuracy"], "best_dev_accuracy": result["best_dev_accuracy"],
                     "steps": result["steps"], "bytes": int(total), "wire_bytes": int(wire),
                     "train_seconds": result["train_seconds"]})
        print(f"{name}: test accuracy {result['test_accuracy']:.4f}, {int(total):,} payload bytes, {int(wire):,} "
              "ring wire bytes", flush=True)
    dp = rows[0]
    for row in rows:
        row["bytes_ratio_vs_dp"] = dp["bytes"] / row["bytes"] if row["bytes"] else float("inf")
        row["wire_ratio_vs_dp"] = dp["wire_bytes"] / row["wire_bytes"] if row["wire_bytes"] else float("inf")
        row["accuracy_gap_vs_dp_points"] = 100 * (row["test_accuracy"] - dp["test_accuracy"])

    data = f"digits@{Lake(lake_root).table('digits').version}"
    table = tracking.result_provenance(["configs/digits_cnn.py", "configs/edge_diloco.py"], data) + "\n\n" + \
        _markdown(rows, args)
    _write_text(out / "table.md", table)
    tracking.write_json_atomic(out / "results.json", {"nodes": args.nodes, "epochs": args.epochs, "rows": rows})
    _plot(rows, out / "accuracy_vs_bytes.png")
    print(table)
    goal = next(r for r in rows if r["run"] == "DiLoCo H=32")
    met = goal["accuracy_gap_vs_dp_points"] >= -1.0 and goal["bytes_ratio_vs_dp"] >= 30
    print(f"goal (DiLoCo H=32 within 1 point of DP with >= 30x fewer bytes): {'MET' if met else 'MISSED'} "
          f"({goal['accuracy_gap_vs_dp_points']:+.2f} points, {goal['bytes_ratio_vs_dp']:.1f}x fewer bytes)")
    return 0


def _markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"{args.nodes} nodes, {args.epochs} epochs, seed {args.seed}; payload = collective operand bytes per "
             "device over the whole run; wire = bytes each device sends under the ring model (all-reduce 2(n-1)/n "
             "of the buffer, all-gather (n-1) x the shard), both from the compiled programs "
             "(lepton_jax.parallel.comm); a node that misses a sync still takes part in the collective", "",
             "| run | H | split | miss prob. | test accuracy | Δ vs DP (points) | payload bytes | DP ÷ payload | "
             "wire bytes | DP ÷ wire |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['H']} | {r['split']} | {r['skip_prob']:g} | {r['test_accuracy']:.4f} | "
                     f"{r['accuracy_gap_vs_dp_points']:+.2f} | {r['bytes']:,} | {r['bytes_ratio_vs_dp']:.1f}× | "
                     f"{r['wire_bytes']:,} | {r['wire_ratio_vs_dp']:.1f}× |")
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def _plot(rows: list[dict], path: Path) -> None:
    """Accuracy against payload bytes, one numbered colour per run: the numbers sit beside the points (runs within a
    few pixels of each other share one label, e.g. "10, 11") and the names in a legend outside the axes, so no text
    overlaps another or leaves the figure."""
    import matplotlib
    from matplotlib.figure import Figure

    from lepton_jax import tracking

    fig = Figure(figsize=(10, 4.5))
    ax = fig.subplots()
    palette = matplotlib.colormaps["tab20"].colors
    points = []
    for i, r in enumerate(rows):
        marker = "s" if r["H"] == 1 else ("^" if r["split"] == "label" else "o")
        color = palette[(2 * i) % 20 + (2 * i) // 20 % 2]  # the ten dark tab20 colours, then the ten light ones
        ax.scatter(r["bytes"], r["test_accuracy"], marker=marker, s=50, color=color, label=f"{i + 1}. {r['run']}",
                   zorder=3)
        points.append((r["bytes"], r["test_accuracy"]))
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.08)
    ax.set_xlabel("collective payload bytes per device, whole run (log)")
    ax.set_ylabel("test accuracy")
    ax.set_title("digits CNN: accuracy vs. communication")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False,
              title="run (square: data parallel, triangle: non-IID)", title_fontsize=8, alignment="left")
    fig.subplots_adjust(left=0.08, right=0.6, bottom=0.12, top=0.92)
    ax.autoscale_view()
    pixels = ax.transData.transform(points)
    groups: list[list[int]] = []
    for i, p in enumerate(pixels):  # a point joins the first group whose first point is within 14 px
        group = next((g for g in groups if abs(pixels[g[0]] - p).max() < 14), None)
        group.append(i) if group is not None else groups.append([i])
    for group in groups:
        x, y = max((points[i] for i in group), key=lambda q: q[0])  # right of the rightmost point of the group
        ax.annotate(", ".join(str(i + 1) for i in group), (x, y), fontsize=8, xytext=(7, -3),
                    textcoords="offset points")
    tracking.save_figure_atomic(fig, path, dpi=120)


if __name__ == "__main__":
    sys.exit(run_script(main))
