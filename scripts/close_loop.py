"""The mission's loop, end to end on CPU, with the real pieces: a server follows ``digits@production``; its traffic
shifts (a second camera comes online that reports inverted intensities: half the requests now come from it);
drift rises; the shifted data is appended to the lake (``--mode
append``); a model is fine-tuned from ``@production`` on the new table version; the gate compares it with production
on that pinned version's test split and promotes it; the following server swaps to it between batches; accuracy and
drift on the shifted traffic recover. Zero failed requests is checked, not assumed.

    .venv/bin/python scripts/close_loop.py --out results/loop      # bash scripts/reproduce.sh loop

Writes ``loop.json`` (the summary quoted in docs/loop.md), ``timeline.jsonl`` (one line per second of traffic) and
``loop.png`` (accuracy and drift over time, the events marked) into ``--out``. Traffic never contains a training
example: it is the version-1 test split (after the shift: half as is, half inverted), while the appended data is
the inverted train and dev splits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = "digits"
STAGE = "production"
PSI_ALARM = 0.25  # the drift monitor's own threshold (ServeConfig.drift_threshold)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Traffic:
    """Client threads sending test rows to the server; one record per answered request."""

    def __init__(self, url: str, rows: dict[str, tuple[np.ndarray, np.ndarray]], *, threads: int,
                 rows_per_request: int):
        self.url, self.rows, self.rows_per_request = url, rows, rows_per_request
        self.phase = "normal"
        self.records: list[tuple[float, str, str, int, int]] = []  # (time, phase, model_version, correct, n)
        self.failures: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _run(self, seed: int) -> None:
        from lepton_jax.serve.client import Client, ServerError

        rng = np.random.default_rng(seed)
        with Client(self.url, timeout_s=60) as client:
            while not self.stop.is_set():
                phase = self.phase
                x, y = self.rows[phase]
                idx = rng.integers(0, len(y), self.rows_per_request)
                try:
                    out = client.infer(MODEL, x[idx])
                except (ServerError, OSError, Exception) as e:  # every failure is counted, none ends the run
                    with self.lock:
                        self.failures.append((time.time(), f"{type(e).__name__}: {e}"))
                    continue
                correct = int((np.asarray(out["class"]).reshape(-1) == y[idx]).sum())
                with self.lock:
                    self.records.append((time.time(), phase, str(out["model_version"]), correct, len(idx)))


def read_drift(client) -> tuple[float | None, float | None]:
    """(max input PSI over the feature groups, prediction PSI) of the model, from /metrics; None before a window."""
    text = client.metrics()
    groups = [float(v) for v in re.findall(r'^lepton_input_drift_psi\{[^}]*model="digits"[^}]*\} (\S+)$', text, re.M)]
    pred = re.findall(r'^lepton_prediction_drift_psi\{[^}]*model="digits"[^}]*\} (\S+)$', text, re.M)
    return (max(groups) if groups else None), (float(pred[0]) if pred else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/loop")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of the from-scratch version 1")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--phase-s", type=float, default=8.0, help="seconds of traffic before the shift and after "
                        "the swap")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rows-per-request", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from lepton_jax.config import load_config
    from lepton_jax.lake import DigitsSource, Lake, NpzSource, ingest
    from lepton_jax.serve.client import Client
    from lepton_jax.serve.predictor import Predictor
    from lepton_jax.serve.registry import PromotionRefused, Registry
    from lepton_jax.tracking import machine
    from lepton_jax.train.loop import train_and_evaluate

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    lake_root = out / "lake"
    events: dict[str, float] = {}
    t_start = time.time()

    def note(event: str, **fields) -> None:
        events[event] = time.time()
        print(f"[{time.time() - t_start:6.1f} s] {event}" + "".join(f" {k}={v}" for k, v in fields.items()),
              flush=True)

    # 1. Version 1: the digits table, a model trained on it from scratch, registered and promoted.
    lake = Lake(lake_root)
    ingest(lake, "digits", DigitsSource())
    v1 = lake.table("digits")
    splits = {s: v1.reader(s).read_all() for s in ("train", "dev", "test")}
    config = load_config(ROOT / "configs" / "digits_cnn.py", [f"num_epochs={args.epochs}", f"seed={args.seed}"])
    train_and_evaluate(config, out / "runs" / "v1", lake_root=lake_root, progress=False)
    registry = Registry(lake_root)
    first = registry.register(MODEL, out / "runs" / "v1", description="from scratch on digits v1")
    registry.promote(MODEL, first.version, STAGE, if_better=True)
    note("v1 promoted", version=first.version)

    # traffic rows: the version-1 test split; after the shift half of it comes from a camera reporting 16 - value
    test_x, test_y = splits["test"]["image"], splits["test"]["label"]
    rows = {"normal": (test_x, test_y),
            "shifted": (np.concatenate([test_x, 16 - test_x]), np.concatenate([test_y, test_y]))}

    # 2. A server following the production stage.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = out / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "lepton_jax", "serve", "--lake", str(lake_root), "--model", f"{MODEL}@{STAGE}",
         "--follow", "--follow-interval-s", "0.5", "--port", str(port), "--log-level", "warning"],
        stdout=log_path.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    timeline: list[dict] = []
    try:
        with Client(url) as client:
            client.wait_ready(timeout_s=180)
            note("server ready")
            traffic = Traffic(url, rows, threads=args.threads, rows_per_request=args.rows_per_request)
            ready_failures = [0]
            sampling = threading.Event()

            def sample() -> None:
                with Client(url) as probe:
                    while not sampling.is_set():
                        t = time.time()
                        if not probe.ready():
                            ready_failures[0] += 1
                        psi, pred_psi = read_drift(probe)
                        timeline.append({"t": t - t_start, "input_psi": psi, "prediction_psi": pred_psi,
                                         "phase": traffic.phase})
                        sampling.wait(max(0.0, 0.5 - (time.time() - t)))

            sampler = threading.Thread(target=sample, daemon=True)
            traffic.start()
            sampler.start()
            time.sleep(args.phase_s)

            # 3. The shift, and the alarm once drift crosses the threshold.
            traffic.phase = "shifted"
            note("traffic shifted")
            deadline = time.time() + 120
            while time.time() < deadline:
                psi = next((r["input_psi"] for r in reversed(timeline) if r["t"] > events["traffic shifted"] - t_start
                            and r["input_psi"] is not None), None)
                if psi is not None and psi > PSI_ALARM:
                    note("drift alarm", input_psi=f"{psi:.3f}")
                    break
                time.sleep(0.2)
            else:
                raise SystemExit("drift never crossed the alarm threshold on shifted traffic")

            # 4. Ingest the shifted data (append), fine-tune from production on it, gate, promote.
            shifted = out / "shifted.npz"
            x = np.concatenate([splits["train"]["image"], splits["dev"]["image"]])
            y = np.concatenate([splits["train"]["label"], splits["dev"]["label"]])
            np.savez(shifted, x=(16 - x).astype(np.uint8), y=y)
            ingest(lake, "digits", NpzSource(shifted, label_names=v1.label_names, value_range=(0.0, 16.0)),
                   mode="append")
            v2 = lake.table("digits")
            note("appended", table_version=v2.version,
                 rows=sum(v2.num_examples(s) for s in v2.splits))
            tune = load_config(ROOT / "configs" / "digits_cnn.py", [
                f"num_epochs={args.finetune_epochs}", f"seed={args.seed}", "init.source=registry",
                f"init.ref={MODEL}@{STAGE}"])
            train_and_evaluate(tune, out / "runs" / "v2", lake_root=lake_root, progress=False)
            candidate = registry.register(MODEL, out / "runs" / "v2", description="fine-tuned on digits v2")
            note("fine-tuned", version=candidate.version)
            try:
                entry = registry.promote(MODEL, candidate.version, STAGE, if_better=True)
            except PromotionRefused as e:
                raise SystemExit(f"the gate refused the fine-tuned model: {e}") from e
            note("promoted", version=candidate.version)

            # 5. The server swaps; traffic goes on until it has been answered by the new version for a while.
            deadline = time.time() + 120
            while time.time() < deadline:
                with traffic.lock:
                    if any(r[2] == str(candidate.version) for r in traffic.records[-200:]):
                        break
                time.sleep(0.1)
            else:
                raise SystemExit("the server never answered with the promoted version")
            note("first answer from new version", version=candidate.version)
            time.sleep(args.phase_s)
            traffic.close()
            sampling.set()
            sampler.join(timeout=30)
            metrics = client.metrics()
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()

    summary = summarise(traffic, timeline, events, t_start, first.version, candidate.version, entry,
                        ready_failures[0], metrics)
    summary["offline_test_accuracy"] = {  # each version on each camera's rows, through offline predict
        f"v{v.version}": {camera: float((Predictor.from_registry(v).predict(x)["class"] == test_y).mean())
                          for camera, x in (("normal", test_x), ("inverted", 16 - test_x))}
        for v in (first, candidate)}
    summary["wall_seconds"] = time.time() - t_start
    summary["machine"] = machine()["label"]
    summary["layout"] = "server: 1 process x 1 CPU device; training: 1 process x 1 CPU device"
    summary["load_average"] = os.getloadavg()
    (out / "loop.json").write_text(json.dumps(summary, indent=1) + "\n")
    with (out / "timeline.jsonl").open("w") as f:
        for row in per_second(traffic, timeline, t_start):
            f.write(json.dumps(row) + "\n")
    plot(out / "loop.png", per_second(traffic, timeline, t_start), events, t_start)
    print(json.dumps(summary, indent=1))
    return 0 if summary["failed_requests"] == 0 and summary["readiness_failures"] == 0 else 1


def summarise(traffic: Traffic, timeline: list[dict], events: dict[str, float], t_start: float, old: int, new: int,
              entry: dict, ready_failures: int, metrics: str) -> dict:
    def accuracy(phase: str, version: int) -> float:
        hits = [(c, n) for _, p, v, c, n in traffic.records if p == phase and v == str(version)]
        return sum(c for c, _ in hits) / max(1, sum(n for _, n in hits))

    def median_psi(lo: float, hi: float) -> float | None:
        vals = [r["input_psi"] for r in timeline if lo <= r["t"] + t_start <= hi and r["input_psi"] is not None]
        return float(np.median(vals)) if vals else None

    swaps = re.findall(r"^lepton_model_swaps_total\{[^}]*\} (\S+)$", metrics, re.M)
    return {
        "requests": len(traffic.records) + len(traffic.failures),
        "failed_requests": len(traffic.failures),
        "failures": traffic.failures[:5],
        "readiness_failures": ready_failures,
        "versions": {"before": old, "after": new},
        "accuracy": {"normal_traffic_v1": accuracy("normal", old), "shifted_traffic_v1": accuracy("shifted", old),
                     "shifted_traffic_v2": accuracy("shifted", new)},
        "input_psi_median": {
            "normal_traffic_v1": median_psi(events["server ready"], events["traffic shifted"]),
            "shifted_traffic_v1": median_psi(events["drift alarm"], events["promoted"]),
            "shifted_traffic_v2": median_psi(events["first answer from new version"] + 2, time.time()),
        },
        "seconds_from_alarm_to_new_version": events["first answer from new version"] - events["drift alarm"],
        "gate": entry.get("comparison"),
        "swaps_total": float(swaps[0]) if swaps else None,
        "events_s": {k: round(v - t_start, 2) for k, v in events.items()},
    }


def per_second(traffic: Traffic, timeline: list[dict], t_start: float) -> list[dict]:
    """Accuracy, requests and the answering versions per second of traffic, with the drift sampled in it."""
    rows: dict[int, dict] = {}
    for t, phase, version, correct, n in traffic.records:
        row = rows.setdefault(int(t - t_start), {"correct": 0, "rows": 0, "requests": 0, "versions": {}})
        row["correct"] += correct
        row["rows"] += n
        row["requests"] += 1
        row["versions"][version] = row["versions"].get(version, 0) + 1
        row["phase"] = phase
    for sample in timeline:
        if sample["input_psi"] is not None and int(sample["t"]) in rows:
            rows[int(sample["t"])]["input_psi"] = sample["input_psi"]
    return [{"t": t, "accuracy": r["correct"] / r["rows"], **r} for t, r in sorted(rows.items())]


def plot(path: Path, seconds: list[dict], events: dict[str, float], t_start: float) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a script, not the library: no display here
    import matplotlib.pyplot as plt

    t0 = events["server ready"] - t_start  # time axis: seconds since the server became ready
    fig, (ax_acc, ax_psi) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    versions = sorted({v for r in seconds for v in r["versions"]}, key=int)
    colors = dict(zip(versions, ("tab:blue", "tab:green", "tab:purple", "tab:brown"), strict=False))
    for version in versions:  # each second's accuracy, coloured by the version that answered most of it
        mine = [r for r in seconds if max(r["versions"], key=r["versions"].get) == version]
        ax_acc.plot([r["t"] - t0 for r in mine], [r["accuracy"] for r in mine], "o", ms=3, color=colors[version],
                    label=f"answered by {MODEL}@{version}")
    ax_acc.set_ylabel("accuracy on live traffic")
    ax_acc.set_ylim(-0.02, 1.02)
    psi = [(r["t"] - t0, max(r["input_psi"], 1e-3)) for r in seconds if "input_psi" in r]
    ax_psi.plot([p[0] for p in psi], [p[1] for p in psi], color="tab:red", lw=1.5, label="input drift (max PSI)")
    ax_psi.axhline(PSI_ALARM, color="tab:red", ls=":", lw=1, label=f"alarm threshold {PSI_ALARM}")
    ax_psi.set_yscale("log")
    ax_psi.set_ylabel("PSI vs. the serving model's\ntraining data")
    ax_psi.set_xlabel("seconds since the server became ready")
    marks = [("traffic shifted", "second camera online", "tab:orange"), ("drift alarm", "drift alarm", "tab:red"),
             ("promoted", "fine-tuned model promoted", "tab:green"),
             ("first answer from new version", "first answer from it", "black")]
    for key, label, color in marks:
        if key in events:
            for ax in (ax_acc, ax_psi):
                ax.axvline(events[key] - t_start - t0, color=color, ls="--", lw=1,
                           label=label if ax is ax_acc else None)
    ax_acc.legend(loc="lower left", fontsize=7, ncol=2)
    ax_psi.legend(loc="upper left", fontsize=7)
    fig.suptitle("digits@production under a sensor shift: drift -> append -> fine-tune -> gate -> swap", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
