"""Where the batched server's CPU per request goes: a cumulative breakdown, one core, no network.

    .venv/bin/python scripts/serve_cost.py --workdir results/digits_cnn [--rounds 300]

In one process pinned to one CPU, 32 concurrent 1-row requests at a time go through the server's ASGI entry
(``ModelServer.__call__``) with stages switched on one after another: the glue alone (decoding, batching and
encoding replaced by constants), + decoding and validation, + the dynamic batcher (a model that returns a constant),
+ encoding the answer, + the real model. Each line is the median CPU microseconds per request of 5 repeats
(``time.process_time``, all threads). Then the model alone at batch 32 (per row), and the floor of uvicorn itself: a
trivial ASGI app (read the body, answer ``{}``) in its own process pinned to one CPU, driven by the raw-socket load
generator from the other CPU at concurrency 32 (CPU per request from /proc). ``scripts/bench_serve.py`` measures the
real servers end to end; this script says what the difference is made of.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STAGES = ("glue", "decode", "batch", "encode", "model")


async def _trivial_app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


def stage_cost(workdir: Path, stage: str, rounds: int) -> float:
    """Median CPU us per request with the stages up to ``stage`` real (run in a fresh process per stage)."""
    out = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--stage", stage, "--rounds",
                          str(rounds)], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return float(out.stdout.strip().splitlines()[-1])


def run_stage(workdir: Path, stage: str, rounds: int) -> None:
    from sklearn.datasets import load_digits

    from lepton_jax.serve import kserve, server
    from lepton_jax.serve.client import infer_request

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    model = server.ServedModel.from_workdir(workdir, name="digits")
    config = server.ServeConfig(max_batch_size=32, max_delay_ms=2.0, replicas=1, max_queue_rows=16384,
                                max_request_rows=4096, max_body_bytes=4 << 20, codec_processes=0)
    srv = server.ModelServer([model], config)
    dep = srv.deployments["digits"]
    upto = STAGES.index(stage)
    bodies = [json.dumps(infer_request(load_digits().images[i:i + 1].astype(np.float32))).encode() for i in range(64)]
    decoded, rows = kserve.decode_rows(bodies[0], None, None, spec=dep.model.spec, body_limit=1 << 20, max_rows=4096)
    constant = np.full((32, len(model.label_names)), 0.1, np.float32)
    if upto < STAGES.index("model"):
        for replica in dep.batcher.replicas:
            replica.fn = lambda batch: constant[:batch.shape[0]]
    if upto < STAGES.index("encode"):
        server.encode_response = lambda *a, **k: (b"{}", kserve.JSON_HEADERS)
        dep.model.__dict__["outputs"] = lambda probabilities: []
    if upto < STAGES.index("batch"):
        async def predict(dep, rows):
            return constant[:1]
        srv.predict = predict
    if upto < STAGES.index("decode"):
        server.decode_rows = lambda *a, **k: (decoded, rows)
    scope = {"type": "http", "method": "POST", "path": "/v2/models/digits/infer",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]}

    async def one(i: int) -> None:
        body = bodies[i % 64]

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            pass
        await srv(scope, receive, send)

    async def main() -> float:
        dep.batcher.start()
        await asyncio.to_thread(srv.warm_up)
        gc.collect()
        gc.freeze()
        costs = []
        for _ in range(6):
            start = time.process_time()
            for k in range(rounds):
                await asyncio.gather(*(one(k * 32 + j) for j in range(32)))
            costs.append((time.process_time() - start) / rounds / 32 * 1e6)
        return float(np.median(costs[1:]))

    import uvloop
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        print(f"{runner.run(main()):.2f}")


def model_per_row(workdir: Path) -> float:
    from lepton_jax.serve.server import ServedModel

    replica = ServedModel.from_workdir(workdir, name="digits").make_replicas(1)[0]
    rows = np.random.default_rng(0).uniform(0, 16, (32, 8, 8, 1)).astype(np.float32)
    replica.run_padded(rows, 32)
    costs = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(200):
            replica.run_padded(rows, 32)
        costs.append((time.process_time() - start) / 200 / 32 * 1e6)
    return float(np.median(costs))


def uvicorn_floor(requests: int) -> float:
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_serve

    cpus = sorted(os.sched_getaffinity(0))
    port = bench_serve.free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--floor", str(port)],
                            preexec_fn=lambda: os.sched_setaffinity(0, {cpus[-1]}))
    try:
        os.sched_setaffinity(0, {cpus[0]})
        time.sleep(3)
        from lepton_jax.serve.loadgen import http_request
        payload = [http_request("POST", "/v2/models/digits/infer", b"x" * 416, {"Content-Type": "application/json"})]
        costs = [bench_serve.throughput_run(port, proc.pid, payload, requests, 32)["server_cpu_ms"] * 1e3
                 for _ in range(3)]
        return float(np.median(costs))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        os.sched_setaffinity(0, set(cpus))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("results/digits_cnn"))
    parser.add_argument("--rounds", type=int, default=300, help="rounds of 32 requests per repeat")
    parser.add_argument("--stage", choices=STAGES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--floor", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        import uvicorn
        uvicorn.run(_trivial_app, host="127.0.0.1", port=args.floor, log_level="warning")
        return
    if args.stage:
        run_stage(args.workdir, args.stage, args.rounds)
        return
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    print("layout: 1 process pinned to 1 CPU, 32 concurrent 1-row requests through ModelServer.__call__ (no network); "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    previous = 0.0
    for stage in STAGES:
        cost = stage_cost(args.workdir, stage, args.rounds)
        print(f"  + {stage:7s} {cost:6.1f} us/request  (this stage {cost - previous:+.1f})", flush=True)
        previous = cost
    floor = uvicorn_floor(10000)  # before this process imports JAX (the server process is started with fork+exec)
    print(f"model alone at batch 32: {model_per_row(args.workdir):.1f} us per row", flush=True)
    print(f"uvicorn floor (trivial ASGI app, its own process on 1 CPU, c=32): {floor:.1f} us/request", flush=True)


if __name__ == "__main__":
    main()
