"""The server under hostile conditions: fuzzed binary-extension headers, compressed bodies that inflate past the
codec-process threshold, slow and stalled clients, connection caps, a bounded drain."""

import contextlib
import gzip
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

from lepton_jax.serve.client import infer_request
from lepton_jax.serve.http_limits import uvicorn_config
from lepton_jax.serve.kserve import (
    HEADER_LENGTH,
    InputSpec,
    RequestError,
    declares_more_than,
    decode_rows,
    inflate_within,
    parse_size,
)
from lepton_jax.serve.registry import Registry
from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel

INFER = "/v2/models/digits/infer"
BODY_TIMEOUT_S, IDLE_TIMEOUT_S, MAX_CONNECTIONS, STALLED = 1.0, 1.0, 200, 200  # scaled down from 30 s, 5 s, 1000


@pytest.fixture(scope="module")
def hostile(trained_run):
    """The trained model served by uvicorn in a thread (codec worker threads, not processes: cheap to start)."""
    config = ServeConfig(max_batch_size=8, codec_processes=0, warm_up_on_startup=False, body_timeout_s=BODY_TIMEOUT_S,
                         idle_timeout_s=IDLE_TIMEOUT_S, max_connections=MAX_CONNECTIONS)
    server = ModelServer([ServedModel.from_workdir(trained_run[0], name="digits")], config)
    server.warm_up()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn_config(server.app, max_connections=config.max_connections, refuse=server.over_capacity,
                                       idle_timeout_s=config.idle_timeout_s, log_config=None, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server never started"
        time.sleep(0.01)
    yield {"server": server, "port": port, "url": f"http://127.0.0.1:{port}", "uvicorn": uv}
    uv.should_exit = True
    thread.join(timeout=60)


def raw_post(port: int, head: bytes, body: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """One POST to the infer route written byte for byte (header values httpx would refuse to send): status, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head
                     + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


HEADER_VALUES = ["²", "٣", "１２", "1²", "-1", "+5", "0x10", "1e3", "1.0", "", " ", "\t7\t", "9" * 5000, "9" * 19,
                 "١٢٣", "12 34", "\x00", "NaN", "inf", "0", "00000000000000000000000001"]


def test_numeric_headers_take_ascii_digits_only():
    assert parse_size("123") == 123 and parse_size(" 7\t") == 7 and parse_size("0") == 0
    for value in ("²", "٣", "１２", "-1", "+5", "1.0", "", "9" * 19, "9" * 5000, "1 2"):
        assert parse_size(value) is None, value


def test_fuzzed_binary_extension_headers_get_4xx_never_an_exception():
    """decode_rows (what the server runs per request) over random Inference-Header-Content-Length values, sizes and
    encodings: a result or a 4xx RequestError, never anything else (the old code raised ValueError on "²" and on
    5000 digits)."""
    spec = InputSpec("digits", "image", (2,), (0.0, 16.0))
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 2], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    body = header + np.ones(2, np.float32).tobytes()
    rng = random.Random(0)
    alphabet = "0123456789 \t-+.e²³¹٠١٢٣۴５x\x00\xb2\xff"
    values = [*HEADER_VALUES, str(len(header)), str(len(header) - 1), str(len(body) + 1)]
    values += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(400)]
    values += [str(rng.randint(0, len(body) + 3)) for _ in range(100)]
    outcomes = {"ok": 0, "4xx": 0}
    for value in values:
        for encoding, payload in ((None, body), ("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
            try:
                decode_rows(payload, value, encoding, spec=spec, body_limit=1 << 16, max_rows=8)
                outcomes["ok"] += 1
            except RequestError as e:
                assert 400 <= e.status < 500, (value, e.status, e.message)
                outcomes["4xx"] += 1
    for size in (-1, 7, 9, 1 << 40, True, 8.0, "8", None, [8]):  # binary_data_size fuzz
        doc = json.dumps({"inputs": [{"name": "image", "shape": [1, 2], "datatype": "FP32",
                                      "parameters": {"binary_data_size": size}}]}).encode()
        with pytest.raises(RequestError) as e:
            decode_rows(doc + np.ones(2, np.float32).tobytes(), str(len(doc)), None, spec=spec, body_limit=1 << 16,
                        max_rows=8)
        assert 400 <= e.value.status < 500
    assert outcomes["ok"] >= 3 and outcomes["4xx"] > 1000, outcomes


def test_non_ascii_digit_headers_over_http_get_kserve_400s(hostile):
    """Sent byte for byte (latin-1, as HTTP carries them): '²' in Inference-Header-Content-Length or
    Content-Length-like values is a 400 with a KServe error body, not a 500; the server stays healthy."""
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 256}}]}).encode()
    body = header + np.zeros(64, np.float32).tobytes()
    assert raw_post(hostile["port"], f"{HEADER_LENGTH}: {len(header)}\r\n".encode(), body)[0] == 200
    failures = []
    for value in ["²", "³", "¹", "\xb2" * 3, "9" * 5000, "1²", "-5", "+5", " "]:
        status, answer = raw_post(hostile["port"], f"{HEADER_LENGTH}: {value}\r\n".encode("latin-1"), body)
        try:
            error = json.loads(answer)["error"]
        except (ValueError, KeyError):
            error = None
        if not (400 <= status < 500 and error):
            failures.append((value[:10], status, answer[:200]))
    assert not failures, failures
    assert httpx.get(hostile["url"] + "/v2/health/ready", timeout=10).status_code == 200


def test_a_gzip_body_that_inflates_past_the_threshold_is_decoded_off_the_event_loop(hostile, monkeypatch):
    """The codec offload is decided on the inflated size: a gzip body under ``inline_parse_bytes`` that inflates
    past it goes to the codec pool (the old code decoded it on the event loop: 1-row p99 5.9x); a small gzip body
    stays inline; a gzip bomb is still refused at the body limit."""
    server = hostile["server"]
    offloaded = []
    real = server._offload

    async def recording(fn, *args):
        offloaded.append(getattr(fn, "func", fn).__name__)
        return await real(fn, *args)

    monkeypatch.setattr(server, "_offload", recording)
    rows = np.random.default_rng(0).integers(0, 17, (1024, 8, 8)).astype(np.float32)
    raw = json.dumps(infer_request(rows)).encode()
    packed = gzip.compress(raw)
    threshold = server.config.inline_parse_bytes
    assert len(packed) < threshold < len(raw), (len(packed), len(raw))
    with httpx.Client(base_url=hostile["url"], timeout=60) as http:
        answer = http.post(INFER, content=packed, headers={"content-type": "application/json",
                                                           "content-encoding": "gzip"})
        assert answer.status_code == 200, answer.text[:300]
        assert offloaded.count("decode_rows") == 1, offloaded
        plain = http.post(INFER, content=raw, headers={"content-type": "application/json"})
        assert plain.json() == answer.json()
        offloaded.clear()
        small = gzip.compress(json.dumps(infer_request(rows[:2])).encode())
        assert http.post(INFER, content=small, headers={"content-encoding": "gzip"}).status_code == 200
        assert offloaded == []  # two rows: inflated inline, decoded inline
        bomb = http.post(INFER, content=gzip.compress(b" " * (server.deployments["digits"].body_limit + 10)),
                         headers={"content-encoding": "gzip"})
        assert bomb.status_code == 413 and "decompressed request body exceeds" in bomb.json()["error"]


def test_the_offload_of_gzip_bodies_is_decided_by_their_trailer_before_inflating_on_the_event_loop():
    """A gzip trailer (ISIZE) over the threshold sends the body to the codec pool with nothing inflated on the event
    loop; one that claims less than the body holds cannot make the event loop inflate past the threshold."""
    rows = np.random.default_rng(0).integers(0, 17, (1024, 8, 8)).astype(np.float32)
    packed, limit = gzip.compress(json.dumps(infer_request(rows)).encode()), 64 << 10
    assert declares_more_than(packed, "gzip", limit) and declares_more_than(packed, " GZIP", limit)
    assert not declares_more_than(packed, "deflate", limit) and not declares_more_than(packed, None, limit)
    small = gzip.compress(b"{}")
    assert not declares_more_than(small, "gzip", limit) and inflate_within(small, "gzip", limit) == b"{}"
    lying = packed[:-4] + (100).to_bytes(4, "little")  # claims 100 bytes: inflating stops past the threshold
    assert not declares_more_than(lying, "gzip", limit) and inflate_within(lying, "gzip", limit) is None


def test_codec_worker_processes_import_no_jax():
    """A codec worker imports what decoding and encoding need (numpy, orjson), never jax, grain or tensorstore: a
    server signalled while it starts its workers waits for them, and a jax import takes seconds on a loaded machine
    (the old code's workers imported jax through the server module and ``lepton_jax.data``)."""
    from concurrent.futures import ProcessPoolExecutor

    from lepton_jax.serve.codec_pool import codec_pool, encode_in_worker
    from lepton_jax.serve.kserve import decode_rows

    pool = codec_pool(1, 0)
    assert isinstance(pool, ProcessPoolExecutor)
    try:  # the server's own worker functions first, then what they made the worker import
        spec = InputSpec("m", "image", (2,), (0.0, 1.0))
        body = json.dumps({"inputs": [{"name": "image", "shape": [1, 2], "datatype": "FP32", "data": [0, 1]}]})
        request, rows = pool.submit(decode_rows, body.encode(), None, None, spec=spec, body_limit=1 << 16,
                                    max_rows=8).result(timeout=60)
        assert rows.shape == (1, 2)
        assert pool.submit(encode_in_worker, request, [], model_name="m", model_version="1").result(timeout=60)
        heavy = pool.submit(eval, "sorted({'jax', 'grain', 'tensorstore', 'flax', 'lepton_jax.serve.lifecycle'}"
                                  " & set(__import__('sys').modules))").result(timeout=60)
    finally:
        pool.shutdown()
    assert heavy == [], heavy


def read_until_closed(sock: socket.socket, deadline: float) -> bytes | None:
    """What the server sent before it closed ``sock`` (None: still open at ``deadline``)."""
    data = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    return None


def test_stalled_bodies_time_out_idle_connections_close_and_the_cap_answers_503(hostile):
    """200 connections send their headers and half a body, then stall: they take every connection slot, so one more
    gets a 503 KServe error; each stalled one gets a 408 and is closed within the body timeout (on the old code they
    stayed open); a connection that never sends a request is closed after the idle timeout; then the server serves
    again."""
    port, uv = hostile["port"], hostile["uvicorn"]
    body = json.dumps(infer_request(np.zeros((1, 8, 8)))).encode()
    head = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    while uv.server_state.connections:  # earlier tests' keep-alive connections close on the idle timeout
        time.sleep(0.05)
    stalled = []
    try:
        for _ in range(STALLED):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(head + body[:len(body) // 2])
            stalled.append(sock)
        sent = time.monotonic()
        over = socket.create_connection(("127.0.0.1", port))
        over.sendall(head + body)
        refused = read_until_closed(over, time.monotonic() + 10)
        over.close()
        assert refused is not None and refused.startswith(b"HTTP/1.1 503"), refused
        assert b"retry-after: 1" in refused.lower() and b"connection: close" in refused.lower(), refused
        assert "limit of 200 connections" in json.loads(refused.partition(b"\r\n\r\n")[2])["error"]
        idle = socket.create_connection(("127.0.0.1", port))
        answers = [read_until_closed(sock, sent + BODY_TIMEOUT_S + 5) for sock in stalled]
        closed_after = time.monotonic() - sent
        assert all(a is not None for a in answers), f"{sum(a is None for a in answers)} stalled connections open"
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), {a[:40] for a in answers}
        assert "did not arrive within 1 s" in json.loads(answers[0].partition(b"\r\n\r\n")[2])["error"]
        assert closed_after < BODY_TIMEOUT_S + 5, closed_after
        assert read_until_closed(idle, time.monotonic() + IDLE_TIMEOUT_S + 5) == b""  # closed, nothing said
        idle.close()
    finally:
        for sock in stalled:
            sock.close()
    assert httpx.post(hostile["url"] + INFER, content=body, timeout=30).status_code == 200
    text = hostile["server"].metrics.render().decode()
    assert 'lepton_errors_total{kind="body_timeout"} 200.0' in text and 'kind="overloaded"} 1.0' in text, text


def launch(trained_run, tmp_path, *flags: str) -> tuple[subprocess.Popen, int, Path]:
    """``lepton-jax serve`` of the trained run in its own session on a free port: the process, port and log file."""
    registry = Registry(tmp_path / "lake")
    registry.promote("digits", registry.register("digits", trained_run[0]).version)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lepton_jax.cli", "serve", "--lake", str(tmp_path / "lake"),
                                 "--model", "digits@production", "--port", str(port), "--log-level", "info", *flags],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return proc, port, log_path


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_sigterm_with_a_stalled_client_exits_within_grace_plus_drain_timeout(trained_run, tmp_path):
    """A client stalls mid-body (its body timeout far away); SIGTERM: the process exits 0 within grace + drain
    timeout, the stalled client gets a 503 KServe error (the old code: a plain-text 500 after 5 + 30 s, and a
    CancelledError traceback in the log), and every accepted request was answered. The defaults fit a 30 s
    termination grace."""
    assert ServeConfig().drain_grace_s + ServeConfig().drain_timeout_s <= 25
    grace_s, drain_s = 1.0, 2.0
    proc, port, log_path = launch(trained_run, tmp_path, "--drain-grace-s", str(grace_s), "--drain-timeout-s",
                                  str(drain_s), "--body-timeout-s", "120")
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        body = json.dumps(infer_request(np.zeros((1, 8, 8)))).encode()
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall((f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                        + body[:20])
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        status = proc.wait(timeout=60)
        took = time.monotonic() - signalled
        answer = read_until_closed(stalled, time.monotonic() + 5)
        stalled.close()
    finally:
        kill_group(proc)
    text = log_path.read_text()
    assert status == 0 and took < grace_s + drain_s + 3, (status, took, text[-3000:])
    assert answer is not None and answer.startswith(b"HTTP/1.1 503"), answer
    assert "force-quit" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"], answer
    for bad in ("Traceback", "CancelledError", "Internal Server Error"):
        assert bad not in text, text[-3000:]
    assert "drain timeout (2 s): not waiting for 1 in-flight request(s)" in text, text[-3000:]
    accepted, answered = re.search(r"drained: answered (\d+) of (\d+) accepted", text).groups()[::-1]
    assert accepted == answered, text[-3000:]


def catches_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a SIGTERM handler (Python has none by default: the CLI's is installed)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(status.split("SigCgt:")[1].split()[0], 16) & (1 << (signal.SIGTERM - 1)))


# (fraction of the measured start-up time after the CLI installed its handlers, signal, to the process group): 10
# delays over imports, model load, compile and warm-up, each signal both ways; one more run is signalled once ready
SCAN = [(i / 9, (signal.SIGINT, signal.SIGTERM)[i % 2], i % 4 >= 2) for i in range(10)]
EXIT_S = 5.0  # issue 26's bound, for every run: start-up handler, uvicorn's lifespan start-up, warm-up compile


def test_a_signal_before_the_server_was_ever_ready_skips_the_drain_grace_and_stops_the_warm_up(trained_run):
    """Readiness never answered 200, so no load balancer sends traffic: the first signal shuts down at once (no 5 s
    grace) and the warm-up stops before its next compile. Once ready, the grace period applies. (The old code waited
    the grace period out and compiled every remaining bucket.)"""
    from lepton_jax.serve.server import graceful_uvicorn

    server = ModelServer([ServedModel.from_workdir(trained_run[0], name="digits")],
                         ServeConfig(codec_processes=0, warm_up_on_startup=False))
    uv = graceful_uvicorn(uvicorn.Config(server.app), server, 5.0)
    uv.handle_exit(signal.SIGTERM, None)
    assert uv.should_exit and server.draining
    compiled = []
    server.deployments["digits"].batcher.replicas[0].run_padded = lambda *a: compiled.append(a)
    server.warm_up()
    assert compiled == [] and not server.ready
    ready = ModelServer([ServedModel.from_workdir(trained_run[0], name="digits")],
                        ServeConfig(codec_processes=0, warm_up_on_startup=False))
    ready._ready.set()  # as warm_up() leaves it
    uv = graceful_uvicorn(uvicorn.Config(ready.app), ready, 5.0)
    uv.handle_exit(signal.SIGTERM, None)
    assert not uv.should_exit and ready.draining  # the grace period runs


@pytest.mark.slow
def test_a_signal_at_any_moment_of_start_up_exits_promptly_and_quietly(trained_run, tmp_path):
    """Ctrl-C or SIGTERM, to the server or to its process group, at 10 delays from the start of the command through
    imports, model load, compile and warm-up, and once serving: each run exits within 5 s with 130/143 (start-up:
    one line) or 0 (uvicorn's lifespan start-up, warm-up or serving: the server's drain), no traceback, no
    "Exception ignored", no segfault. The runs use --drain-grace-s 0: start-up times vary too much on a loaded
    machine to keep the last delays short of readiness, after which the grace period is the point (a server never
    ready skips it: the test above). The old code printed tracebacks (KeyboardInterrupt in an import), lost some
    SIGINTs in jax's GC callback, and died by SIGTERM; before the codec workers stopped importing jax and the first
    signal stopped the warm-up, runs signalled during the lifespan start-up took up to 8.6 s."""
    registry = Registry(tmp_path / "lake")
    registry.promote("digits", registry.register("digits", trained_run[0]).version)

    def start(name: str) -> tuple[subprocess.Popen, int, Path]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        log_path = tmp_path / f"{name}.log"
        with open(log_path, "w") as log:
            return subprocess.Popen([sys.executable, "-m", "lepton_jax.cli", "serve", "--lake", str(tmp_path / "lake"),
                                     "--model", "digits@production", "--port", str(port), "--drain-grace-s", "0",
                                     "--max-batch-size", "4", "--log-level", "warning"],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "JAX_PLATFORMS": "cpu"}), port, log_path

    def handlers_installed(proc: subprocess.Popen, log_path: Path) -> float:
        deadline = time.monotonic() + 60
        while not catches_sigterm(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.005)
        return time.monotonic()

    def signal_and_wait(proc: subprocess.Popen, log_path: Path, delay: float, sig: signal.Signals,
                        group: bool) -> None:
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        signalled = time.monotonic()
        try:
            status = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            status = None
        results.append((delay, sig.name, group, status, time.monotonic() - signalled, log_path.read_text()))

    results: list[tuple] = []
    proc, port, log_path = start("ready")  # signalled once serving; measures the start-up time
    try:
        installed = handlers_installed(proc, log_path)
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < installed + 120, log_path.read_text()
            time.sleep(0.02)
        start_up_s = time.monotonic() - installed
        signal_and_wait(proc, log_path, start_up_s, signal.SIGINT, True)
    finally:
        kill_group(proc)
    for batch in range(0, len(SCAN), 3):  # three at a time: the scan stays around a minute
        runs = [(i, *start(f"scan{i}")) for i in range(batch, min(batch + 3, len(SCAN)))]
        try:
            due = [(handlers_installed(proc, log_path) + SCAN[i][0] * start_up_s, i, proc, log_path)
                   for i, proc, _, log_path in runs]  # each run's clock starts when its handlers are in place
            for at, i, proc, log_path in sorted(due, key=lambda d: d[0]):
                time.sleep(max(0.0, at - time.monotonic()))
                signal_and_wait(proc, log_path, SCAN[i][0] * start_up_s, SCAN[i][1], SCAN[i][2])
        finally:
            for _, proc, _, _ in runs:
                kill_group(proc)
    print("\n".join(f"delay {d:5.2f} s {s:7s} group={g!s:5s} status {st} after {t:.2f} s"
                    for d, s, g, st, t, _ in results))  # with -s: the scan
    expected = {"SIGINT": 130, "SIGTERM": 143}
    bad = [r for r in results if r[3] not in (0, expected[r[1]]) or len(r[5].strip().splitlines()) > 1
           or r[4] >= EXIT_S
           or any(s in r[5] for s in ("Traceback", "Exception ignored", "KeyboardInterrupt", "Segmentation"))]
    assert not bad, bad
    assert any(r[3] == expected[r[1]] and "while the server starts or stops" in r[5] for r in results), results
    assert results[0][3] == 0, results[0]  # once serving: the server's own drain, exit 0


def test_the_connection_cap_fits_the_open_file_limit(caplog):
    """The soft open-file limit is raised as far as the cap needs (within the hard limit); past the hard limit the
    cap comes down, with a warning, so the 503 comes before accept() runs out of file descriptors."""
    import resource

    from lepton_jax.serve.http_limits import SPARE_FILES, fit_connection_cap

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert fit_connection_cap(100) == 100  # fits: nothing changes
        if hard == resource.RLIM_INFINITY or hard >= 1000 + SPARE_FILES:
            assert fit_connection_cap(1000) == 1000
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 1000 + SPARE_FILES  # raised
        if hard != resource.RLIM_INFINITY:
            with caplog.at_level("WARNING", logger="lepton_jax.serve"):
                assert fit_connection_cap(hard + 10) == hard - SPARE_FILES
            assert "capping connections" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
