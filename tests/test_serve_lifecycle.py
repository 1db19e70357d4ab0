"""`lepton-jax serve` as a process: SIGTERM under load (c=64) drains without losing accepted requests; logging;
one or two SIGTERMs or Ctrl-Cs exit 0 without a traceback."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from lepton_jax.serve import loadgen
from lepton_jax.serve.client import infer_request
from lepton_jax.serve.registry import Registry

# SIGTERM goes out once SIGNAL_AFTER requests are answered; TOTAL only bounds the load, which must outlast the
# grace period on a fast idle machine too (once the server has exited, the rest are refused at once: a large TOTAL
# is cheap)
SIGNAL_AFTER, TOTAL, CONCURRENCY, GRACE_S = 2000, 40000, 64, 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_large_body(port: int) -> httpx.Response:
    """A 300-row inference request: over ``inline_parse_bytes``, so the server's codec worker process decodes it."""
    rows = np.random.default_rng(0).uniform(0, 16, (300, 8, 8)).astype(np.float32)
    return httpx.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=infer_request(rows), timeout=60)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILLs a server started in its own session (and its workers) if it is still running."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def launch_serve(trained_run, tmp_path, grace_s: float, **popen) -> tuple[subprocess.Popen, int, Path]:
    """``lepton-jax serve`` of the trained run as a process on a free 127.0.0.1 port, its output in a file: the
    process, port and log file, at once."""
    registry = Registry(tmp_path / "lake")
    registry.promote("digits", registry.register("digits", trained_run[0]).version)
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lepton_jax.cli", "serve", "--lake", str(tmp_path / "lake"),
                                 "--model", "digits@production", "--port", str(port), "--max-queue-rows", "4096",
                                 "--drain-grace-s", str(grace_s), "--log-level", "info"],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                                **popen)
    return proc, port, log_path


def start_serve(trained_run, tmp_path, grace_s: float, **popen) -> tuple[subprocess.Popen, int, Path, int]:
    """:func:`launch_serve`, once ready: the process, port, log file and the number of readiness probes it answered
    meanwhile."""
    proc, port, log_path = launch_serve(trained_run, tmp_path, grace_s, **popen)
    try:
        deadline, answers = time.monotonic() + 120, 0
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10).status_code
                answers += 1
                if status == 200:
                    return proc, port, log_path, answers
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.1)
        raise AssertionError(f"server never became ready: {log_path.read_text()[-3000:]}")
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def test_sigterm_under_load_drains_without_losing_accepted_requests(trained_run, tmp_path):
    proc, port, log_path, startup_answers = start_serve(trained_run, tmp_path, GRACE_S)
    try:
        body = json.dumps(infer_request(np.full((1, 8, 8), 3.0))).encode()
        request = loadgen.http_request("POST", "/v2/models/digits/infer", body,
                                       {"Content-Type": "application/json"})
        ready = loadgen.http_request("GET", "/v2/health/ready")
        done = []
        probes: list[loadgen.Outcome] = []

        async def main():
            async def terminate_and_probe():
                while len(done) < SIGNAL_AFTER:
                    await asyncio.sleep(0.005)
                proc.send_signal(signal.SIGTERM)
                signalled = time.perf_counter()
                while time.perf_counter() - signalled < GRACE_S + 3 and proc.returncode is None:
                    probes.extend(await loadgen.drive("127.0.0.1", port, lambda i: ready, 1, 1, keep_body=True))
                    await asyncio.sleep(0.05)
                return signalled

            load = loadgen.drive("127.0.0.1", port, lambda i: request, TOTAL, CONCURRENCY, on_response=done.append,
                                 keep_body=True)
            return await asyncio.gather(load, terminate_and_probe())

        outcomes, signalled = asyncio.run(asyncio.wait_for(main(), timeout=180))
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert len(outcomes) == TOTAL
    statuses = [o.status for o in outcomes]
    refused = [o for o in outcomes if o.error and o.error.startswith("refused")]
    lost = [o for o in outcomes if o.error and o.error.startswith("lost")]
    # nothing but answers and refusals
    assert set(statuses) <= {200, 0}, [(o.status, o.body) for o in outcomes if o.status not in (200, 0)][:3]
    # the server's own count: every request it accepted was answered, and each answer reached its client
    accepted, answered = map(int, re.search(r"drained: answered (\d+) of (\d+) accepted", text).groups()[::-1])
    ok = statuses.count(200)
    probes_answered = sum(1 for p in probes if p.status)
    assert answered == accepted == ok + probes_answered + startup_answers, (answered, accepted, ok, text[-2000:])
    # so a request without a response (its connection reset before the server read it, e.g. still in the
    # kernel's accept queue when the listener closed) was never accepted
    assert ok + len(refused) + len(lost) == TOTAL and ok >= SIGNAL_AFTER and refused  # load outlasted the grace
    # readiness said "draining" during the grace period while inference still answered 200
    draining = [p for p in probes if p.status == 503 and json.loads(p.body)["error"] == "draining"]
    assert draining and draining[0].start - signalled < GRACE_S, [(p.start - signalled, p.status) for p in probes]
    assert any(o.status == 200 and o.start > draining[0].end for o in outcomes)
    # --log-level info reaches our loggers even though absl configured logging first
    for line in ("warm-up done", "SIGTERM: serving on for 1.0 s", "draining: readiness answers 503", "drained:"):
        assert line in text, text[-3000:]


@pytest.mark.parametrize("sig, presses, group", [(signal.SIGTERM, 2, False), (signal.SIGTERM, 1, True),
                                                 (signal.SIGINT, 1, True), (signal.SIGINT, 2, True)],
                         ids=["sigterm-twice", "sigterm-to-the-group", "ctrl-c-once", "ctrl-c-twice"])
def test_signals_exit_cleanly(trained_run, tmp_path, sig, presses, group):
    """SIGTERM to the server or to its whole process group (``kill -- -PGID``, codec worker included), or Ctrl-C as
    a terminal sends it (SIGINT to the group): exit 0, no traceback, the codec worker still decoding large bodies
    during the drain; a second signal ends the grace period at once."""
    grace_s = 1.0 if presses == 1 else 120.0  # two signals: exiting within the wait below proves the skip
    proc, port, log_path, _ = start_serve(trained_run, tmp_path, grace_s, start_new_session=True)
    send = (lambda: os.killpg(proc.pid, sig)) if group else (lambda: proc.send_signal(sig))
    try:
        send()
        deadline = time.monotonic() + 30
        while httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "readiness never said draining"
            time.sleep(0.05)
        answer = post_large_body(port)  # the codec worker must still be there during the drain
        assert answer.status_code == 200 and len(answer.content) > 0, answer.text[:500]
        if presses == 2:
            send()
        status = proc.wait(timeout=60)
    finally:
        kill_group(proc)
    text = log_path.read_text()
    assert status == 0 and "Traceback" not in text and "drained: answered" in text, (status, text[-3000:])
    assert (f"{sig.name}: ending the grace period now" in text) == (presses == 2), text[-3000:]


def test_a_killed_codec_worker_is_replaced(trained_run, tmp_path):
    """The codec worker process decoding large bodies is SIGKILLed (as the OOM killer would): the next large
    request still answers 200 (a fresh worker pool, the request run once more), and so does the one after."""
    proc, port, log_path, _ = start_serve(trained_run, tmp_path, 1.0, start_new_session=True)
    try:
        children = [int(c) for t in Path(f"/proc/{proc.pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
        workers = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert workers, children
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        for pid in workers:
            while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
                time.sleep(0.05)
        for _ in range(2):
            answer = post_large_body(port)
            assert answer.status_code == 200, answer.text[:500]
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
    finally:
        kill_group(proc)
    text = log_path.read_text()
    assert status == 0 and "a codec worker process died; starting new ones" in text, (status, text[-3000:])


def test_force_quit_answers_what_is_left_and_exits_cleanly(trained_run, tmp_path):
    """Ctrl-C, then Ctrl-C again while requests are still running (uvicorn's force quit): exit 0 at once, no
    traceback, the unfinished requests answered 503 (or dropped if the client left), the lifespan shutdown run (the
    batchers stop, the codec workers exit). A client stuck mid-body keeps the first Ctrl-C's wait going for sure."""
    proc, port, log_path, _ = start_serve(trained_run, tmp_path, 0.0, start_new_session=True)
    stuck = socket.create_connection(("127.0.0.1", port))
    rows = np.random.default_rng(0).uniform(0, 16, (300, 8, 8)).astype(np.float32)  # a legal size, codec-decoded
    body = json.dumps(infer_request(rows)).encode()
    head = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    stuck.sendall(head + body[:100])  # and never the rest
    outcomes: list[str] = []

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            while proc.poll() is None:
                try:
                    answer = client.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", content=body,
                                         headers={"content-type": "application/json"})
                except httpx.TransportError:
                    outcomes.append("closed")
                    return
                outcomes.append(f"{answer.status_code} {answer.text[:100] if answer.status_code != 200 else ''}")

    threads = [threading.Thread(target=load) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        while len(outcomes) < 4:  # the load runs
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(1.0)
        assert proc.poll() is None, "the first Ctrl-C must wait for the stuck request"
        os.killpg(proc.pid, signal.SIGINT)
        status = proc.wait(timeout=60)
        for t in threads:
            t.join(timeout=60)
    finally:
        stuck.close()
        kill_group(proc)
    text = log_path.read_text()
    assert status == 0 and "Traceback" not in text, (status, text[-3000:])
    assert re.search(r"force quit: [1-9]\d* unfinished request\(s\) answered 503", text), text[-3000:]
    assert "drained: answered" in text, text[-3000:]  # the lifespan shutdown ran
    assert all(o.startswith(("200", "503", "closed")) for o in outcomes), outcomes
    assert all("force-quit" in o or "shutting down" in o for o in outcomes if o.startswith("503")), outcomes


@pytest.mark.parametrize("delay_s, grace_s", [(0.0, 0.0), (0.15, 1.0)], ids=["no-grace", "grace"])
def test_ctrl_c_during_start_up_exits_cleanly(trained_run, tmp_path, delay_s, grace_s):
    """Ctrl-C (SIGINT to the process group) while the server starts: its codec worker is still importing and XLA
    compiles the warm-up on a thread. Exit 0, no traceback, no abort (a process that exits under a compile on a
    daemon thread dies with 'terminate called' and rc 134), and the codec workers did start."""
    proc, _, log_path = launch_serve(trained_run, tmp_path, grace_s, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Waiting for application startup" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.01)
        time.sleep(delay_s)
        os.killpg(proc.pid, signal.SIGINT)
        status = proc.wait(timeout=120)
    finally:
        kill_group(proc)
    text = log_path.read_text()
    assert status == 0, (status, text[-3000:])
    for bad in ("Traceback", "KeyboardInterrupt", "terminate called", "did not start"):
        assert bad not in text, text[-3000:]


def test_a_force_quit_during_the_lifespan_shutdown_changes_nothing(trained_run):
    """The second Ctrl-C comes while the batchers already drain (the lifespan shutdown has begun): no abandon, no
    second lifespan shutdown, no "force quit" warning; and a codec pool already shut down answers 503, not 500."""
    import uvicorn

    from lepton_jax.serve.codec_pool import submit
    from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel, graceful_uvicorn

    server = ModelServer([ServedModel.from_workdir(trained_run[0], name="digits")],
                         ServeConfig(codec_processes=0, warm_up_on_startup=False))
    batcher = server.deployments["digits"].batcher
    calls = []
    real_drain, real_abandon = batcher.drain, server.abandon

    async def slow_drain(timeout_s: float = 30.0) -> None:
        calls.append("drain")
        await asyncio.sleep(0.5)
        await real_drain(timeout_s)

    batcher.drain = slow_drain
    server.abandon = lambda: calls.append("abandon") or real_abandon()
    uv = graceful_uvicorn(uvicorn.Config(server.app, host="127.0.0.1", port=0, lifespan="on", log_level="warning"),
                          server, 0.0)

    async def main() -> None:
        serving = asyncio.ensure_future(uv.serve())
        while not uv.started:
            await asyncio.sleep(0.01)
        uv.handle_exit(signal.SIGINT, None)  # the first Ctrl-C: no grace period, the shutdown starts
        while not calls:
            await asyncio.sleep(0.01)
        uv.handle_exit(signal.SIGINT, None)  # the second, during the drain: uvicorn's force quit
        await asyncio.wait_for(serving, 30)
        from lepton_jax.serve.kserve import RequestError

        with pytest.raises(RequestError) as refused:  # the lifespan shut the codec pool down
            await submit(server._pool, sum, [1])
        assert refused.value.status == 503

    asyncio.run(main())
    assert uv.force_exit and calls == ["drain"], calls


CODEC_MASK = """
import asyncio, multiprocessing, os, signal, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import resource_tracker

from lepton_jax.serve.codec_pool import submit


def signals_blocked_at_start(_):  # no initializer here: the mask the worker process started with
    status = open(f"/proc/{os.getpid()}/status").read()
    return int(status.split("SigBlk:")[1].split()[0], 16)


async def main():
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    resource_tracker.ensure_running()
    os.kill(resource_tracker._resource_tracker._pid, signal.SIGKILL)  # as the OOM killer might
    time.sleep(0.2)
    print(await submit(pool, signals_blocked_at_start, 0))
    pool.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
"""


def test_codec_workers_start_with_ctrl_c_blocked_even_after_the_resource_tracker_died(tmp_path):
    """A codec worker starts with SIGINT and SIGTERM blocked (so a Ctrl-C cannot interrupt its imports), also when
    multiprocessing must restart its resource tracker first: that restart unblocks both signals in the caller."""
    script = tmp_path / "codec_mask.py"
    script.write_text(CODEC_MASK)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    mask = int(out.stdout.strip().splitlines()[-1])
    for sig in (signal.SIGINT, signal.SIGTERM):
        assert mask & (1 << (sig - 1)), (hex(mask), out.stderr[-2000:])
