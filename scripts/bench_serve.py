"""Serving benchmark: batched vs unbatched vs a bare Starlette+uvicorn endpoint at c=32, and head-of-line blocking.

    .venv/bin/python scripts/bench_serve.py [--workdir runs/digits_cnn] [--requests 5000] [--repeats 5]

Without --workdir it ingests digits into a temporary lake and trains a short run (3 epochs). Three servers run
as separate processes, pinned with ``sched_setaffinity`` (as ``taskset`` does) to one CPU while the load generator
runs on another, when the machine has two or more:

- ``batched``: ``lepton-jax serve``'s server, one replica, dynamic batching (max 32 rows, 2 ms);
- ``unbatched``: the same server with max batch 1 and no delay;
- ``bare``: a Starlette+uvicorn endpoint that parses the same JSON body (``json.loads`` + ``np.asarray``) and
  replies a small JSON answer without any model: the ceiling of Python HTTP on this machine as the issue defined it;
- ``bare_orjson``: the same endpoint with orjson, the JSON library the server uses -- the like-for-like ceiling and
  the headline ratio (a server cannot claim the JSON library's speed-up as its own).

The load generator (:mod:`lepton_jax.serve.loadgen`) writes pre-encoded requests on raw asyncio sockets (uvloop)
and reads responses by Content-Length; its own CPU per request is printed beside the server's (from
``/proc/<pid>/stat``). Runs are interleaved (batched, unbatched, bare, bare_orjson, batched, ...) and reported as median
[min-max] over the repeats; ratios are taken per repeat. Then the head-of-line test: 1-row requests at
concurrency 1 against the batched server, alone and while two clients keep sending 3.75 MB bodies (about 3,000
rows each; the batched server here accepts them: max 4,096 rows, 4 MB bodies, unlike the default body limit that
answers 413), interleaved. The same head-of-line runs go, interleaved, to a fourth server that differs from
``batched`` only in ``codec_niceness=0`` (its codec worker at the server's own CPU priority): the A/B of that setting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BARE_ORJSON = "bare_orjson"  # the same bare endpoint with the server's JSON library (orjson): like-for-like codec
MODES = {"batched": "dynamic batching (max 32, 2 ms)", "unbatched": "no batching (max 1)",
         "bare": "bare Starlette+uvicorn parse+reply", BARE_ORJSON: "bare, orjson parse+reply"}
NICE0 = "batched_codec_nice0"  # the head-of-line A/B: batched, codec workers at the server's own priority


# -- servers (run as `bench_serve.py --serve MODE`) -------------------------------------------------------------
def serve(args: argparse.Namespace) -> None:
    if args.serve in ("bare", BARE_ORJSON):
        import orjson
        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        fast = args.serve == BARE_ORJSON

        async def infer(request: Request) -> Response:
            body = (orjson.loads if fast else json.loads)(await request.body())
            rows = np.asarray(body["inputs"][0]["data"], np.float32)
            answer = {"model_name": "bare", "outputs": [{"name": "class", "datatype": "INT64", "shape": [1],
                                                         "data": [int(rows.size > 0)]}]}
            return Response(orjson.dumps(answer), media_type="application/json") if fast else JSONResponse(answer)

        async def ready(request: Request) -> JSONResponse:
            return JSONResponse({"ready": True})

        app = Starlette(routes=[Route("/v2/models/digits/infer", infer, methods=["POST"]),
                                Route("/v2/health/ready", ready)])
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
        return
    from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel, run_server

    batched = args.serve in ("batched", NICE0)
    config = ServeConfig(max_batch_size=32 if batched else 1, max_delay_ms=2.0 if batched else 0.0, replicas=1,
                         max_queue_rows=16384, max_request_rows=4096, max_body_bytes=4 << 20,
                         **({"codec_niceness": 0} if args.serve == NICE0 else {}))
    run_server(ModelServer([ServedModel.from_workdir(args.workdir, name="digits")], config), port=args.port,
               log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(mode: str, workdir: Path, cpus: set[int] | None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", mode, "--workdir", str(workdir), "--port", str(port)]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.Popen(cmd, env=env, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    return proc, port


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 300, path: str = "/v2/health/ready") -> None:
    """Polls ``path`` until it answers 200; exits if the server process ends or ``timeout_s`` passes."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the benchmark server on port {port} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server on port {port} not ready after {timeout_s} s")


def short_run(tmp: Path) -> Path:
    """A 3-epoch run of the default config on the digits table in a lake under ``tmp``; its workdir."""
    from lepton_jax.config import load_config
    from lepton_jax.lake import DigitsSource, Lake, ingest
    from lepton_jax.train.loop import train_and_evaluate

    print("training a 3-epoch run ...", flush=True)
    ingest(Lake(tmp / "data"), "digits", DigitsSource())
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "digits_cnn.py", ["num_epochs=3"])
    train_and_evaluate(config, tmp / "run", lake_root=tmp / "data", progress=False)
    return tmp / "run"


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children (the server and its codec worker)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for cpid in child.read_text().split():
            try:
                cf = Path(f"/proc/{cpid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(cf[11]) + int(cf[12])
            except FileNotFoundError:
                pass
    return total / os.sysconf("SC_CLK_TCK")


def batch_stats(port: int) -> tuple[float, float]:
    import httpx

    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return 0.0, 0.0
    values = {name: float(m.group(1)) if (m := re.search(rf"^{name}\{{[^}}]*\}} (\S+)", text, re.M)) else 0.0
              for name in ("lepton_batch_size_sum", "lepton_batch_size_count")}
    return values["lepton_batch_size_sum"], values["lepton_batch_size_count"]


def request_bytes(rows: np.ndarray) -> bytes:
    from lepton_jax.serve.client import infer_request
    from lepton_jax.serve.loadgen import http_request

    body = json.dumps(infer_request(rows)).encode()
    return http_request("POST", "/v2/models/digits/infer", body, {"Content-Type": "application/json"})


# -- measurements -----------------------------------------------------------------------------------------------
def throughput_run(port: int, pid: int, requests: list[bytes], total: int, concurrency: int) -> dict[str, float]:
    from lepton_jax.serve import loadgen

    loadgen.run(loadgen.drive("127.0.0.1", port, lambda i: requests[i % len(requests)], 64, concurrency))  # warm
    rows_before, batches_before = batch_stats(port)
    cpu0, self0 = cpu_seconds(pid), resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    outcomes = loadgen.run(loadgen.drive("127.0.0.1", port, lambda i: requests[i % len(requests)], total,
                                         concurrency))
    elapsed = time.perf_counter() - start
    cpu1, self1 = cpu_seconds(pid), resource.getrusage(resource.RUSAGE_SELF)
    rows_after, batches_after = batch_stats(port)
    bad = [o for o in outcomes if o.status != 200]
    if bad:
        raise SystemExit(f"{len(bad)} of {total} requests failed, e.g. {bad[0]}")
    lat = np.asarray([o.latency_s for o in outcomes]) * 1e3
    client_cpu = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
    return {"rps": total / elapsed, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "server_cpu_ms": (cpu1 - cpu0) / total * 1e3, "client_cpu_ms": client_cpu / total * 1e3,
            "batch": (rows_after - rows_before) / max(1.0, batches_after - batches_before)}


def head_of_line_run(port: int, small: list[bytes], large: bytes, n: int, loaded: bool) -> dict[str, float]:
    from lepton_jax.serve import loadgen

    async def main():
        stop = asyncio.Event()
        big: list[int] = []

        async def large_client():
            while not stop.is_set():
                out = await loadgen.drive("127.0.0.1", port, lambda i: large, 1, 1)
                big.append(out[0].status)

        background = [asyncio.ensure_future(large_client()) for _ in range(2 if loaded else 0)]
        if loaded:
            await asyncio.sleep(0.5)  # bodies are arriving
        outcomes = await loadgen.drive("127.0.0.1", port, lambda i: small[i % len(small)], n, 1)
        stop.set()
        await asyncio.gather(*background)
        return outcomes, big

    outcomes, big = loadgen.run(main())
    if any(o.status != 200 for o in outcomes):
        raise SystemExit(f"small requests failed: {[o for o in outcomes if o.status != 200][:1]}")
    lat = np.asarray([o.latency_s for o in outcomes]) * 1e3
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "large": len(big),
            "large_ok": big.count(200)}


def ray_runs(workdir: Path, tmp: Path, args: argparse.Namespace, small: list[bytes], server_cpus: set[int] | None,
             client_cpus: set[int] | None) -> list[dict[str, float]]:
    """The batched model on Ray Serve (`lepton-jax serve --backend ray`, local Ray), after the other modes."""
    from lepton_jax.serve.registry import Registry

    registry = Registry(tmp / "ray-lake")
    registry.register("digits", workdir)
    port = free_port()
    cmd = [sys.executable, "-m", "lepton_jax.cli", "serve", "--backend", "ray", "--lake", str(tmp / "ray-lake"),
           "--model", "digits@1", "--port", str(port), "--replicas", str(args.ray_replicas),
           "--num-cpus-per-replica", "0.5", "--max-batch-size", "32", "--max-delay-ms", "2", "--log-level", "warning"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
    if client_cpus:
        os.sched_setaffinity(0, set(os.sched_getaffinity(0)) | (server_cpus or set()))
    proc = subprocess.Popen(cmd, env=env, preexec_fn=(lambda: os.sched_setaffinity(0, server_cpus))
                            if server_cpus else None)
    try:
        if client_cpus:
            os.sched_setaffinity(0, client_cpus)
        wait_ready(port, proc)
        out = []
        for r in range(args.repeats):
            run = throughput_run(port, proc.pid, small, args.requests, args.concurrency)
            out.append(run)
            print(f"  repeat {r + 1}/{args.repeats} ray       {run['rps']:8.0f} req/s", flush=True)
        return out
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def summary(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(np.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="a trained run (default: train a short one)")
    parser.add_argument("--requests", type=int, default=5000, help="1-row requests per throughput run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of every measurement")
    parser.add_argument("--hol-requests", type=int, default=300, help="1-row requests per head-of-line run")
    parser.add_argument("--ray-replicas", type=int, default=0,
                        help="also measure `lepton-jax serve --backend ray` with this many replicas (0: skip)")
    parser.add_argument("--serve", choices=sorted([*MODES, NICE0]), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    from sklearn.datasets import load_digits

    print("command:", " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, client_cpus = ({cpus[-1]}, {cpus[0]}) if len(cpus) >= 2 else (None, None)
    images = load_digits().images.astype(np.float32)
    small = [request_bytes(images[i:i + 1]) for i in range(64)]
    rng = np.random.default_rng(0)
    large_rows = rng.uniform(0, 16, (3000, 8, 8))
    large = request_bytes(large_rows)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or short_run(Path(tmp))
        servers = {mode: start_server(mode, workdir, server_cpus) for mode in MODES}
        ab_server = start_server(NICE0, workdir, server_cpus)
        try:
            for proc, port in [*servers.values(), ab_server]:
                wait_ready(port, proc)
            if client_cpus:
                os.sched_setaffinity(0, client_cpus)
            try:
                import uvloop  # noqa: F401
                loop = "uvloop"
            except ImportError:
                loop = "asyncio"
            print(f"layout: 1 process per server, 1 replica on 1 CPU device; servers pinned to CPU "
                  f"{sorted(server_cpus) if server_cpus else 'any'}, load generator (raw sockets, {loop}) to CPU "
                  f"{sorted(client_cpus) if client_cpus else 'any'} of {len(cpus)} visible; "
                  f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
            results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
            for r in range(args.repeats):
                for mode, (proc, port) in servers.items():
                    results[mode].append(throughput_run(port, proc.pid, small, args.requests, args.concurrency))
                    print(f"  repeat {r + 1}/{args.repeats} {mode:9s} {results[mode][-1]['rps']:8.0f} req/s",
                          flush=True)
            if args.ray_replicas:
                results["ray"] = ray_runs(workdir, Path(tmp), args, small, server_cpus, client_cpus)
            hol: dict[bool, list[dict[str, float]]] = {False: [], True: []}
            hol_ab: dict[bool, list[dict[str, float]]] = {False: [], True: []}
            for r in range(args.repeats):
                for runs, (_, port) in ((hol, servers["batched"]), (hol_ab, ab_server)):
                    for loaded in (False, True):
                        runs[loaded].append(head_of_line_run(port, small, large, args.hol_requests, loaded))
                print(f"  repeat {r + 1}/{args.repeats} head-of-line: p99 {hol[False][-1]['p99']:.1f} ms alone, "
                      f"{hol[True][-1]['p99']:.1f} ms with large bodies; codec_niceness=0: "
                      f"{hol_ab[False][-1]['p99']:.1f} / {hol_ab[True][-1]['p99']:.1f} ms", flush=True)
        finally:
            for proc, _ in [*servers.values(), ab_server]:
                proc.terminate()
            for proc, _ in [*servers.values(), ab_server]:
                proc.wait(timeout=60)
    c = args.concurrency
    print(f"\nconcurrency {c}, {args.requests} single-example requests per run, {args.repeats} interleaved repeats, "
          "median [min-max]:")
    print(f"  {'':36s} {'req/s':>22s} {'p50 ms':>20s} {'p99 ms':>20s} {'server CPU ms/req':>20s} "
          f"{'client CPU ms/req':>20s} {'rows/batch':>12s}")
    for mode, label in MODES.items():
        rs = results[mode]
        batch = summary([x["batch"] for x in rs]) if not mode.startswith("bare") else "-"
        print(f"  {label:36s} {summary([x['rps'] for x in rs], '{:.0f}'):>22s} "
              f"{summary([x['p50'] for x in rs]):>20s} {summary([x['p99'] for x in rs]):>20s} "
              f"{summary([x['server_cpu_ms'] for x in rs], '{:.3f}'):>20s} "
              f"{summary([x['client_cpu_ms'] for x in rs], '{:.3f}'):>20s} {batch:>12s}")
    if "ray" in results:
        rs = results["ray"]
        print(f"  {'Ray Serve, ' + str(args.ray_replicas) + ' replicas (@serve.batch 32)':36s} "
              f"{summary([x['rps'] for x in rs], '{:.0f}'):>22s} {summary([x['p50'] for x in rs]):>20s} "
              f"{summary([x['p99'] for x in rs]):>20s} {'(many processes)':>20s} "
              f"{summary([x['client_cpu_ms'] for x in rs], '{:.3f}'):>20s}")
        ratio_r = [r["rps"] / b["rps"] for r, b in zip(rs, results["batched"], strict=False)]
        print(f"  throughput Ray Serve / one-process batched: {summary(ratio_r, '{:.3f}')}x")
    ratio_u = [b["rps"] / u["rps"] for b, u in zip(results["batched"], results["unbatched"], strict=True)]
    ratio_b = [b["rps"] / u["rps"] for b, u in zip(results["batched"], results["bare"], strict=True)]
    ratio_o = [b["rps"] / u["rps"] for b, u in zip(results["batched"], results[BARE_ORJSON], strict=True)]
    print(f"  throughput batched / unbatched:  {summary(ratio_u, '{:.2f}')}x   (goal >= 3x)")
    print(f"  throughput batched / bare ceiling, same JSON library (orjson): {summary(ratio_o, '{:.2f}')}x   "
          "(goal >= 0.7x; the headline)")
    print(f"  throughput batched / bare ceiling, standard-library json:      {summary(ratio_b, '{:.2f}')}x   "
          "(the previous revisions' baseline)")
    print(f"\nhead-of-line: {args.hol_requests} 1-row requests at concurrency 1 to the batched server, alone vs while "
          f"2 clients send {len(large) / 1e6:.2f} MB bodies ({large_rows.shape[0]} rows):")
    for loaded in (False, True):
        hs = hol[loaded]
        extra = (f"  ({summary([h['large_ok'] for h in hs], '{:.0f}')} large bodies answered 200 per run)"
                 if loaded else "")
        print(f"  {'with large bodies' if loaded else 'alone':18s} p50 {summary([h['p50'] for h in hs]):>20s} ms  "
              f"p99 {summary([h['p99'] for h in hs]):>20s} ms{extra}")
    ratio = [h["p99"] / a["p99"] for a, h in zip(hol[False], hol[True], strict=True)]
    print(f"  p99 with large bodies / alone: {summary(ratio, '{:.2f}')}x   (goal <= 2x)")
    from lepton_jax.serve.server import ServeConfig

    ratio_ab = [h["p99"] / a["p99"] for a, h in zip(hol_ab[False], hol_ab[True], strict=True)]
    print(f"A/B, the same runs interleaved against a batched server whose codec worker runs at the server's own "
          f"priority (codec_niceness=0; default {ServeConfig().codec_niceness}):")
    print(f"  codec_niceness=0: p99 alone {summary([h['p99'] for h in hol_ab[False]])} ms, with large bodies "
          f"{summary([h['p99'] for h in hol_ab[True]])} ms, ratio {summary(ratio_ab, '{:.2f}')}x")


if __name__ == "__main__":
    main()
