"""Zero-downtime swaps: the p99 latency of a `lepton-jax serve --follow` server while its stage is promoted again
and again, against its steady-state p99 in the same run.

    .venv/bin/python scripts/bench_swap.py [--workdir runs/digits_cnn] [--requests 6000] [--swaps 3] [--repeats 5]

Without --workdir it ingests digits into a temporary lake and trains a short run (3 epochs). The run is registered as
version 1 of ``digits`` in a temporary lake, with two more versions whose parameters are version 1's plus noise
(distinct predictions, the same architecture), and ``lepton-jax serve --model digits@production --follow`` serves
it as its own process, pinned to one CPU while the load generator (:mod:`lepton_jax.serve.loadgen`, raw sockets)
runs on another when the machine has two or more. Each repeat runs two load windows of ``--requests`` 1-row
requests at ``--concurrency``, interleaved: *steady* (no promotion) and *swaps* (``--swaps`` promotions evenly
spread over the window, each to another version, so the server loads, warms and swaps in a new version each
time). Printed: p50/p99 of each window as median [min-max] over the repeats, and the ratio of the two p99s per
repeat (goal <= 2x), the number of swaps that took effect inside each window (answers carry ``model_version``),
and every failed request (there should be none).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_serve  # the sibling script: server start-up, readiness, short runs, summaries
import numpy as np
from bench_serve import summary

from lepton_jax.tracking import machine

ROOT = Path(__file__).resolve().parents[1]
_VERSION = re.compile(rb'"model_version":"(\d+)"')


def serving(port: int) -> int | None:
    """The version the server's stable deployment serves now (its ``lepton_model_version`` gauge)."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = re.search(r'^lepton_model_version\{model="digits",role="stable"\} (\S+)', text, re.M)
    return int(float(found[1])) if found else None


def window(port: int, requests: list[bytes], total: int, concurrency: int, registry, promotions: list[int]) -> dict:
    """One load window; ``promotions`` are promoted to production at evenly spaced points of it."""
    from lepton_jax.serve import loadgen

    answered = [0]
    events: list[tuple[int, float]] = []

    def count(_outcome: loadgen.Outcome) -> None:
        answered[0] += 1

    async def promote() -> None:
        for k, version in enumerate(promotions, 1):
            while answered[0] < k * total // (len(promotions) + 1):
                await asyncio.sleep(0.005)
            events.append((version, time.perf_counter()))
            await asyncio.to_thread(registry.promote, "digits", version)

    async def main() -> list[loadgen.Outcome]:
        load = loadgen.drive("127.0.0.1", port, lambda i: requests[i % len(requests)], total, concurrency,
                             keep_body=True, on_response=count)
        outcomes, _ = await asyncio.gather(load, promote())
        return outcomes

    outcomes = loadgen.run(main())
    failed = [o for o in outcomes if o.status != 200]
    versions = [int(m[1]) if (m := _VERSION.search(o.body[:200])) else -1 for o in outcomes]
    took = []  # promotion -> first answer (by end time) of the promoted version from a request started after it
    for version, at in events:
        ends = [o.end for o, v in zip(outcomes, versions, strict=True) if v == version and o.start > at]
        if ends:
            took.append(min(ends) - at)
    lat = np.asarray([o.latency_s for o in outcomes]) * 1e3
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "failed": len(failed),
            "swapped": len(took), "swap_s": took, "seconds": max(o.end for o in outcomes) -
            min(o.start for o in outcomes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="a trained run (default: train a short one)")
    parser.add_argument("--requests", type=int, default=6000, help="1-row requests per load window")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--swaps", type=int, default=3, help="promotions during each swap window")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved steady/swap window pairs")
    parser.add_argument("--follow-interval-s", type=float, default=0.1)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # tests.serving: registering noisy versions of a model
    from sklearn.datasets import load_digits

    from lepton_jax.serve.client import infer_request
    from lepton_jax.serve.loadgen import http_request
    from lepton_jax.serve.registry import Registry
    from tests.serving import register_variant

    print("command:", " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    print(f"machine: {machine()['label']}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at start",
          flush=True)
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, client_cpus = ({cpus[-1]}, {cpus[0]}) if len(cpus) >= 2 else (None, None)
    import orjson

    images = load_digits().images.astype(np.float32)
    requests = [http_request("POST", "/v2/models/digits/infer", orjson.dumps(infer_request(images[i:i + 1])),
                             {"Content-Type": "application/json"}) for i in range(64)]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or bench_serve.short_run(Path(tmp))
        registry = Registry(Path(tmp) / "lake")
        v1 = registry.register("digits", workdir)
        versions = [1] + [register_variant(registry, v1, seed=seed).version for seed in (1, 2)]
        registry.promote("digits", 1)
        port = bench_serve.free_port()
        log_path = Path(tmp) / "server.log"
        cmd = [sys.executable, "-m", "lepton_jax.cli", "serve", "--lake", str(Path(tmp) / "lake"), "--model",
               "digits@production", "--port", str(port), "--follow", "--follow-interval-s",
               str(args.follow_interval_s), "--max-queue-rows", "4096", "--drain-grace-s", "0"]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
        if server_cpus:  # as `taskset` does, before the server starts its threads and codec worker
            os.sched_setaffinity(proc.pid, server_cpus)
        try:
            bench_serve.wait_ready(port, proc)
            if client_cpus:
                os.sched_setaffinity(0, client_cpus)
            print(f"server: {' '.join(cmd[1:])}\nlayout: server pinned to CPU "
                  f"{sorted(server_cpus) if server_cpus else 'any'}, load generator to CPU "
                  f"{sorted(client_cpus) if client_cpus else 'any'} of {len(cpus)} visible", flush=True)
            window(port, requests, 1000, args.concurrency, registry, [])  # warm the connections and caches
            steady, swaps, current = [], [], 0
            for r in range(args.repeats):
                steady.append(window(port, requests, args.requests, args.concurrency, registry, []))
                plan = []
                for _ in range(args.swaps):
                    current = (current + 1) % len(versions)
                    plan.append(versions[current])
                swaps.append(window(port, requests, args.requests, args.concurrency, registry, plan))
                deadline = time.monotonic() + 60  # the last swap done before the next steady window
                while serving(port) != plan[-1]:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"version {plan[-1]} never served:\n{log_path.read_text()[-3000:]}")
                    time.sleep(0.05)
                print(f"  repeat {r + 1}/{args.repeats}: p99 steady {steady[-1]['p99']:.1f} ms, during swaps "
                      f"{swaps[-1]['p99']:.1f} ms ({swaps[-1]['swapped']}/{args.swaps} swaps inside the "
                      f"{swaps[-1]['seconds']:.1f} s window), failed {steady[-1]['failed'] + swaps[-1]['failed']}",
                      flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        text = log_path.read_text()
    warmed = [float(m) for m in re.findall(r"loaded and warmed in ([\d.]+) s", text)]
    refused = text.count("refused version")
    print(f"\nconcurrency {args.concurrency}, {args.requests} 1-row requests per window, {args.repeats} interleaved "
          f"repeats, median [min-max]; load average {os.getloadavg()[0]:.1f} at the end:")
    print(f"  steady            p50 {summary([w['p50'] for w in steady]):>18s} ms   p99 "
          f"{summary([w['p99'] for w in steady]):>18s} ms")
    print(f"  {args.swaps} swaps/window    p50 {summary([w['p50'] for w in swaps]):>18s} ms   p99 "
          f"{summary([w['p99'] for w in swaps]):>18s} ms")
    print(f"  load + warm-up per version (server log): {summary(warmed, '{:.2f}')} s over {len(warmed)} swaps; "
          f"promotion to first answer of the new version: "
          f"{summary([s for w in swaps for s in w['swap_s']], '{:.2f}')} s; refused versions: {refused}")
    failed = sum(w["failed"] for w in steady + swaps)
    print(f"  failed requests: {failed} of {args.requests * 2 * args.repeats}")
    ratios = [b["p99"] / a["p99"] for a, b in zip(steady, swaps, strict=True)]
    print(f"  p99 during swaps / steady p99: {summary(ratios, '{:.2f}')}x   (goal <= 2x)")


if __name__ == "__main__":
    main()
