"""Serving benchmark: dynamic batching vs. none at concurrency 32 over loopback HTTP, and HTTP overhead at 1.

    .venv/bin/python scripts/bench_serve.py [--workdir runs/digits_cnn] [--requests 3000]

Without --workdir it ingests digits into a temporary lake and trains a short run (3 epochs). Each server runs in
its own process (``--serve`` mode of this script) so the load generator does not share its interpreter; each serves
one replica on one device. Prints requests/s and p50/p99 latency of both modes and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def serve(args: argparse.Namespace) -> None:
    from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel, run_server

    config = ServeConfig(max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms, replicas=1,
                         max_queue_rows=4096)
    run_server(ModelServer([ServedModel.from_workdir(args.workdir, name="digits")], config), port=args.port,
               log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, rows: np.ndarray, requests: int, concurrency: int) -> dict[str, float]:
    from lepton_jax.serve.client import AsyncClient

    latencies: list[float] = []
    counter = iter(range(requests))

    async with AsyncClient(url, timeout_s=60, max_connections=concurrency) as client:
        async def worker():
            for i in counter:
                row = rows[i % len(rows)][None]
                start = time.perf_counter()
                await client.infer("digits", row)
                latencies.append(time.perf_counter() - start)

        for _ in range(min(50, requests)):  # warm the connections
            await client.infer("digits", rows[:1])
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {"rps": requests / elapsed, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def run_mode(workdir: Path, max_batch_size: int, max_delay_ms: float, rows: np.ndarray, requests: int,
             concurrency_levels: list[int]) -> dict[int, dict[str, float]]:
    from lepton_jax.serve.client import Client

    port = free_port()
    cmd = [sys.executable, __file__, "--serve", "--workdir", str(workdir), "--port", str(port),
           "--max-batch-size", str(max_batch_size), "--max-delay-ms", str(max_delay_ms)]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.Popen(cmd, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        with Client(url) as client:
            client.wait_ready(timeout_s=180)
        return {c: asyncio.run(load(url, rows, requests if c > 1 else max(200, requests // 10), c))
                for c in concurrency_levels}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def direct_p50_ms(workdir: Path, rows: np.ndarray, n: int = 500) -> float:
    """p50 of a direct call of the same jitted function on one row (no HTTP, no batcher)."""
    from lepton_jax.serve.server import ServedModel

    replica = ServedModel.from_workdir(workdir, name="digits").make_replicas(1)[0]
    replica.run_padded(rows[:1], 1)
    times = []
    for i in range(n):
        start = time.perf_counter()
        replica.run_padded(rows[i % len(rows)][None], 1)
        times.append(time.perf_counter() - start)
    return float(np.percentile(np.asarray(times) * 1000, 50))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="a trained run (default: train a short one)")
    parser.add_argument("--requests", type=int, default=3000, help="requests per mode at concurrency 32")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch-size", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--max-delay-ms", type=float, default=2.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    from sklearn.datasets import load_digits

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir
        if workdir is None:
            from lepton_jax.config import load_config
            from lepton_jax.lake import DigitsSource, Lake, ingest
            from lepton_jax.train.loop import train_and_evaluate

            ingest(Lake(Path(tmp) / "lake"), "digits", DigitsSource())
            workdir = Path(tmp) / "run"
            config = load_config(Path(__file__).parents[1] / "configs" / "digits_cnn.py", ["num_epochs=3"])
            train_and_evaluate(config, workdir, lake_root=Path(tmp) / "lake", progress=False)
        rows = load_digits().images.astype(np.float32)[..., None]
        batched = run_mode(workdir, 32, 2.0, rows, args.requests, [args.concurrency, 1])
        unbatched = run_mode(workdir, 1, 0.0, rows, args.requests, [args.concurrency])
        direct = direct_p50_ms(workdir, rows)
    c = args.concurrency
    b, u, one = batched[c], unbatched[c], batched[1]
    print(f"concurrency {c}, {args.requests} single-example requests over loopback HTTP, 1 replica:")
    for label, r in (("dynamic batching (max 32, 2 ms)", b), ("no batching (max 1)", u)):
        print(f"  {label:32s} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms")
    print(f"  throughput ratio batched / unbatched: {b['rps'] / u['rps']:.2f}x")
    print("concurrency 1:")
    print(f"  HTTP p50 {one['p50_ms']:.2f} ms  direct jitted call p50 {direct:.3f} ms  "
          f"overhead {one['p50_ms'] - direct:.2f} ms ({one['p50_ms'] / direct:.1f}x)")


if __name__ == "__main__":
    main()
