"""Peer benchmark: lepton's server (batched, unbatched) against LitServe serving the same checkpoint, at c=32.

    pip install -e '.[bench-serve]'       # litserve 0.2.19: a benchmark extra, never a runtime dependency
    .venv/bin/python scripts/bench_serve_peers.py [--workdir runs/digits_cnn] [--requests 5000] [--repeats 5] \
        [--out results/bench_serve_peers.json]   # the runs and ratios as JSON, for docs/numbers.toml

Without --workdir it trains a short run (as ``bench_serve.py`` does). Three servers run as separate processes, all
pinned with ``sched_setaffinity`` to one CPU while the load generator runs on another (when there are two or more):

- ``batched``: ``lepton-jax serve``'s server, one replica, dynamic batching (max 32 rows, 2 ms);
- ``unbatched``: the same server with max batch 1 and no delay;
- ``litserve``: LitServe with the same batching parameters (``max_batch_size=32``, ``batch_timeout=0.002``, one
  worker, one API server), whose ``predict`` runs the same jitted function (``ServedModel.make_replicas``, padded
  to the same bucket sizes) on the same KServe v2 JSON body at the same path.

The load generator (:mod:`lepton_jax.serve.loadgen`, raw sockets) sends the same pre-encoded 1-row requests to each;
runs are interleaved (batched, unbatched, litserve, batched, ...) and reported as median [min-max] over the repeats,
ratios taken per repeat; the load average and the client's CPU per request are printed beside them.

Then (``--gzip-repeats``, default 5) the compressed head-of-line check against the batched server: 1-row p99 at
concurrency 1 alone and while two clients keep sending gzip bodies of 1,024 rows (about 50 kB compressed, under the
64 KiB codec-offload threshold, about 355 kB inflated: the server must decide the offload on the inflated size),
interleaved; the ratio is taken per repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import litserve as ls  # the bench-serve extra
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_serve  # noqa: E402  (the sibling script: servers, load runs, summaries)

from lepton_jax.tracking import write_json_atomic  # noqa: E402

PEERS = {"batched": "lepton, dynamic batching (max 32, 2 ms)", "unbatched": "lepton, no batching (max 1)",
         "litserve": "LitServe 0.2.19, batching (max 32, 2 ms)"}
MAX_BATCH, DELAY_S = 32, 0.002


class DigitsAPI(ls.LitAPI):
    """LitServe's API for the checkpoint, through lepton's jitted function padded to the same buckets."""

    def __init__(self, workdir: str, **options: object):
        super().__init__(**options)
        self.workdir = workdir

    def setup(self, device: str) -> None:
        from lepton_jax.serve.batcher import bucket_sizes
        from lepton_jax.serve.server import ServedModel

        self.model = ServedModel.from_workdir(self.workdir, name="digits")
        self.replica = self.model.make_replicas(1)[0]
        self.buckets = bucket_sizes(MAX_BATCH)
        for bucket in self.buckets:  # compile every bucket before traffic, as lepton's warm-up does
            self.replica.run_padded(np.zeros((bucket, *self.model.example_shape), np.float32), bucket)

    def decode_request(self, request: dict) -> np.ndarray:
        return np.asarray(request["inputs"][0]["data"], np.float32).reshape(self.model.example_shape)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        rows = rows.reshape(-1, *self.model.example_shape)
        return self.replica.run_padded(rows, next(b for b in self.buckets if b >= rows.shape[0]))

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, probabilities: np.ndarray) -> dict:
        return {"model_name": "digits", "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [1, len(probabilities)],
             "data": probabilities.tolist()},
            {"name": "class", "datatype": "INT64", "shape": [1], "data": [int(probabilities.argmax())]}]}


def serve_litserve(workdir: Path, port: int) -> None:
    """LitServe serving the checkpoint through lepton's jitted function, on the KServe v2 infer path."""
    api = DigitsAPI(str(workdir), max_batch_size=MAX_BATCH, batch_timeout=DELAY_S,
                    api_path="/v2/models/digits/infer")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=30)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, log_level="warning", generate_client_file=False)


def start(mode: str, workdir: Path, cpus: set[int] | None) -> tuple[subprocess.Popen, int]:
    if mode != "litserve":
        return bench_serve.start_server(mode, workdir, cpus)
    port = bench_serve.free_port()
    cmd = [sys.executable, __file__, "--serve", "litserve", "--workdir", str(workdir), "--port", str(port)]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    return subprocess.Popen(cmd, env=env, start_new_session=True,  # LitServe's workers outlive a SIGTERM to it alone
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None), port


def wait_ready(mode: str, port: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    bench_serve.wait_ready(port, proc, timeout_s, path="/health" if mode == "litserve" else "/v2/health/ready")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server (to its whole session where it has one: LitServe), SIGKILL after 60 s."""
    own_session = os.getsid(proc.pid) == proc.pid if proc.poll() is None else False
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, None)):
        if own_session:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    if own_session:  # the session's other processes (LitServe's workers) go too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def gzip_request(rows: np.ndarray) -> bytes:
    """An inference request with a gzip body that is small compressed but large inflated."""
    from lepton_jax.serve.client import infer_request
    from lepton_jax.serve.loadgen import http_request

    raw = json.dumps(infer_request(rows)).encode()
    body = gzip.compress(raw)
    print(f"gzip body: {len(body):,} bytes compressed, {len(raw):,} inflated", flush=True)
    return http_request("POST", "/v2/models/digits/infer", body, {"Content-Type": "application/json",
                                                                  "Content-Encoding": "gzip"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="a trained run (default: train a short one)")
    parser.add_argument("--requests", type=int, default=5000, help="1-row requests per run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats")
    parser.add_argument("--gzip-repeats", type=int, default=5, help="repeats of the gzip head-of-line check (0: skip)")
    parser.add_argument("--hol-requests", type=int, default=300, help="1-row requests per head-of-line run")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the runs and ratios as JSON here (e.g. results/bench_serve_peers.json)")
    parser.add_argument("--serve", choices=["litserve"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_litserve(args.workdir, args.port)
        return
    from sklearn.datasets import load_digits

    print("command:", " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, client_cpus = ({cpus[-1]}, {cpus[0]}) if len(cpus) >= 2 else (None, None)
    images = load_digits().images.astype(np.float32)
    small = [bench_serve.request_bytes(images[i:i + 1]) for i in range(64)]
    gzipped = gzip_request(np.random.default_rng(0).integers(0, 17, (1024, 8, 8)).astype(np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or bench_serve.short_run(Path(tmp))
        servers = {mode: start(mode, workdir, server_cpus) for mode in PEERS}
        try:
            for mode, (proc, port) in servers.items():
                wait_ready(mode, port, proc)
            if client_cpus:
                os.sched_setaffinity(0, client_cpus)
            load_at_start = os.getloadavg()
            print(f"layout: 1 process per server, 1 model worker on 1 CPU device; servers pinned to CPU "
                  f"{sorted(server_cpus) if server_cpus else 'any'}, load generator to CPU "
                  f"{sorted(client_cpus) if client_cpus else 'any'} of {len(cpus)} visible; "
                  f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
            results: dict[str, list[dict[str, float]]] = {mode: [] for mode in PEERS}
            for r in range(args.repeats):
                for mode, (proc, port) in servers.items():
                    results[mode].append(bench_serve.throughput_run(port, proc.pid, small, args.requests,
                                                                    args.concurrency))
                    print(f"  repeat {r + 1}/{args.repeats} {mode:9s} {results[mode][-1]['rps']:8.0f} req/s "
                          f"p99 {results[mode][-1]['p99']:.1f} ms", flush=True)
            hol: dict[bool, list[dict[str, float]]] = {False: [], True: []}
            for _ in range(args.gzip_repeats):
                for loaded in (False, True):
                    hol[loaded].append(bench_serve.head_of_line_run(servers["batched"][1], small, gzipped,
                                                                    args.hol_requests, loaded))
        finally:
            for proc, _ in servers.values():
                stop(proc)
    summary = bench_serve.summary
    print(f"\n1-row requests at c={args.concurrency}, {args.requests} per run, {args.repeats} interleaved repeats: "
          "median [min-max]; load average {:.1f} at the end".format(os.getloadavg()[0]))
    print(f"{'server':10s} {'req/s':>22s} {'p50 ms':>18s} {'p99 ms':>18s} {'server CPU ms/req':>20s} "
          f"{'client CPU ms/req':>20s}")
    for mode, runs in results.items():
        print(f"{mode:10s} {summary([r['rps'] for r in runs], '{:.0f}'):>22s} {summary([r['p50'] for r in runs]):>18s} "
              f"{summary([r['p99'] for r in runs]):>18s} {summary([r['server_cpu_ms'] for r in runs], '{:.3f}'):>20s} "
              f"{summary([r['client_cpu_ms'] for r in runs], '{:.3f}'):>20s}   {PEERS[mode]}")
    ratios: dict[str, dict[str, float | list[float]]] = {}
    for mode in ("batched", "unbatched"):
        rps = [a["rps"] / b["rps"] for a, b in zip(results[mode], results["litserve"], strict=True)]
        p99 = [a["p99"] / b["p99"] for a, b in zip(results[mode], results["litserve"], strict=True)]
        cpu = [a["server_cpu_ms"] / b["server_cpu_ms"] for a, b in zip(results[mode], results["litserve"],
                                                                         strict=True)]
        print(f"{mode} / litserve: req/s {summary(rps, '{:.2f}')}x, p99 {summary(p99, '{:.2f}')}x, server CPU per "
              f"request {summary(cpu, '{:.2f}')}x")
        ratios[f"{mode}_over_litserve"] = {"rps_median": float(np.median(rps)), "p99_median": float(np.median(p99)),
                                           "server_cpu_median": float(np.median(cpu)), "rps": rps, "p99": p99,
                                           "server_cpu": cpu}
    if hol[True]:
        ratio = [b["p99"] / a["p99"] for a, b in zip(hol[False], hol[True], strict=True)]
        print(f"\ngzip head-of-line (batched, 1-row requests at c=1, {args.hol_requests} per run, {args.gzip_repeats} "
              f"interleaved repeats): p99 alone {summary([h['p99'] for h in hol[False]])} ms, while two clients send "
              f"gzip bodies {summary([h['p99'] for h in hol[True]])} ms ({sum(h['large_ok'] for h in hol[True])} "
              f"answered 200); loaded / alone p99 {summary(ratio, '{:.2f}')}x")
        ratios["gzip_loaded_over_alone_p99"] = {"median": float(np.median(ratio)), "per_repeat": ratio}
    if args.out is not None:
        write_json_atomic(args.out, {
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "git_revision": git_revision(),
            "load_average_start": load_at_start, "load_average_end": os.getloadavg(), "cpus_visible": len(cpus),
            "server_cpus": sorted(server_cpus) if server_cpus else None,
            "client_cpus": sorted(client_cpus) if client_cpus else None,
            "requests": args.requests, "concurrency": args.concurrency, "repeats": args.repeats,
            "hol_requests": args.hol_requests, "gzip_repeats": args.gzip_repeats, "servers": PEERS,
            "runs": results, "gzip_head_of_line": {"alone": hol[False], "loaded": hol[True]}, "ratios": ratios})
        print(f"wrote {args.out}")


def git_revision() -> str:
    """The checkout's commit (with -dirty for uncommitted changes), or "unknown" outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "diff", "--quiet"], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


if __name__ == "__main__":
    main()
