"""The server under hostile conditions: fuzzed binary-extension headers, compressed bodies that inflate past the
codec-process threshold, slow and stalled clients, connection caps, a bounded drain."""

import gzip
import json
import random
import socket
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
import uvicorn

from lepton_jax.serve.kserve import HEADER_LENGTH, InputSpec, RequestError, decode_rows, parse_size
from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel

INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def hostile(trained_run):
    """The trained model served by uvicorn in a thread (codec worker threads, not processes: cheap to start)."""
    server = ModelServer([ServedModel.from_workdir(trained_run[0], name="digits")],
                         ServeConfig(max_batch_size=8, codec_processes=0, warm_up_on_startup=False))
    server.warm_up()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(server.app, log_config=None, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server never started"
        time.sleep(0.01)
    yield {"server": server, "port": port, "url": f"http://127.0.0.1:{port}"}
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
