"""The HTTP server on a random 127.0.0.1 port: readiness, v2 inference, bad inputs, auth, metrics, load, 429, drift."""

import asyncio
import json
import logging
import os
import re
import socket
import threading
import time

import httpx
import jax
import numpy as np
import pytest
import uvicorn

from lepton_jax.lake import Lake
from lepton_jax.serve import Predictor
from lepton_jax.serve.client import AsyncClient, Client, ServerError, infer_request
from lepton_jax.serve.drift import drift_report
from lepton_jax.serve.registry import Registry
from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel

TOKEN = "s3cret-token"
CONFIG = ServeConfig(max_batch_size=16, max_delay_ms=2.0, max_queue_rows=64, request_timeout_s=30.0,
                     max_body_bytes=64 * 1024, max_request_rows=64, replicas=2, token=TOKEN, drift_window=256,
                     drift_min_samples=200, drift_threshold=0.25, drift_interval_s=0.05,
                     warm_up_on_startup=False)


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
    """A registered model served by uvicorn in a thread; records what the server said before warm-up."""
    workdir, _ = trained_run
    registry = Registry(tmp_path_factory.mktemp("servelake"))
    entry = registry.register("digits", workdir)
    registry.promote("digits", entry.version)
    server = ModelServer([ServedModel.from_registry(registry.lake_root, "digits@production")], CONFIG)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", timeout_graceful_shutdown=30))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.01)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    before = {"live": httpx.get(f"{url}/v2/health/live", timeout=10).status_code,
              "ready": httpx.get(f"{url}/v2/health/ready", timeout=10).status_code,
              "infer": httpx.post(f"{url}/v2/models/digits/infer", headers=headers, timeout=10,
                                  json=infer_request(np.zeros((1, 8, 8)))).status_code}
    server.warm_up()
    yield {"url": url, "server": server, "uvicorn": uv, "before": before, "workdir": workdir, "headers": headers}
    uv.should_exit = True
    thread.join(timeout=60)


@pytest.fixture(scope="module")
def splits(trained_run):
    data = json.loads((trained_run[0] / "run.json").read_text())["data"]
    table = Lake(data["lake"]).table(data["table"], data["version"])
    return {s: table.reader(s).read_all() for s in ("train", "test")}


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text output (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            sample, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in sample for k, v in labels.items()):
                return float(value)
    return 0.0


def test_ready_only_after_warm_up(served):
    assert served["before"] == {"live": 200, "ready": 503, "infer": 503}
    assert httpx.get(served["url"] + "/v2/health/ready", timeout=10).status_code == 200


def test_v2_infer_matches_direct_prediction(served, splits):
    rows = splits["test"]["image"][:40]
    with Client(served["url"], token=TOKEN) as client:
        meta = client.metadata("digits")
        out = client.infer("digits", rows, request_id="abc")
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
    assert meta["parameters"]["registry"] == "digits@1" and meta["parameters"]["stage"] == "production"
    direct = Predictor.from_workdir(served["workdir"]).predict(rows)
    assert out["id"] == "abc" and out["model_version"] == "1"
    np.testing.assert_array_equal(out["class"], direct["class"])
    np.testing.assert_allclose(out["probabilities"], direct["probability"], atol=1e-5)


def test_bad_inputs_get_4xx_with_a_message_and_count_as_errors(served):
    url, headers = served["url"], served["headers"]
    infer = f"{url}/v2/models/digits/infer"
    good = infer_request(np.zeros((2, 8, 8)))

    def with_input(**changes):
        body = json.loads(json.dumps(good))
        body["inputs"][0].update(changes)
        return json.dumps(body)

    nan = good["inputs"][0]["data"][:]
    nan[3] = float("nan")
    cases = [
        ("shape", 400, with_input(shape=[2, 4, 8], data=[0.0] * 64), "expected [N, 8, 8, 1]"),
        ("shape", 400, with_input(shape=[3, 8, 8]), "data has 128 values but shape [3, 8, 8] needs 192"),
        ("datatype", 400, with_input(datatype="BYTES"), "BYTES data must be strings"),
        ("datatype", 400, with_input(datatype="BYTES", data=["a"] * 128), "datatype 'BYTES' is not supported; "
                                                                          "expected FP32"),
        ("datatype", 400, with_input(data=["a"] * 128), "not numbers of datatype FP32"),
        ("non_finite", 400, with_input(data=nan), "1 example(s) contain NaN or inf"),
        ("range", 400, with_input(data=[255.0] * 128), "trained on [0.0, 16.0]"),
        ("bad_json", 400, "{not json", "not valid JSON"),
        ("bad_request", 400, json.dumps({"instances": [1]}), "expected a KServe v2 inference request"),
        ("too_large", 413, json.dumps(infer_request(np.full((200, 8, 8), 12.345678))),
         "exceeds the limit of 65536 bytes"),
        ("too_large", 413, json.dumps(infer_request(np.zeros((65, 8, 8)))), "holds 4160 elements; this server "
                                                                             "takes at most 4096 per request"),
    ]
    before = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    with httpx.Client(headers={**headers, "Content-Type": "application/json"}, timeout=30) as http:
        for kind, status, body, message in cases:
            response = http.post(infer, content=body)
            assert (response.status_code, kind) == (status, kind), response.text
            assert message in response.json()["error"], (kind, response.json())
        response = http.post(f"{url}/v2/models/nope/infer", content=json.dumps(good))
        assert response.status_code == 404 and "unknown model 'nope'; this server serves: digits" in response.text
        response = http.post(f"{url}/v2/models/digits/versions/7/infer", content=json.dumps(good))
        assert response.status_code == 404 and "serves version 1" in response.text
        assert http.post(infer, content=json.dumps(good)).status_code == 200  # still serving
    after = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    for kind in {c[0] for c in cases} | {"unknown_model"}:
        expected = sum(c[0] == kind for c in cases) + (2 if kind == "unknown_model" else 0)
        assert metric(after, "lepton_errors_total", kind=kind) - metric(before, "lepton_errors_total", kind=kind) \
            == expected, kind


def test_auth(served):
    url = served["url"]
    rows = infer_request(np.zeros((1, 8, 8)))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = httpx.post(f"{url}/v2/models/digits/infer", json=rows, headers=headers, timeout=10)
        assert response.status_code == 401 and "bearer token" in response.json()["error"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{url}/v2/models/digits", timeout=10).status_code == 401
    assert httpx.get(f"{url}/v2/health/live", timeout=10).status_code == 200  # probes stay open
    with pytest.raises(ServerError, match="HTTP 401"), Client(url) as client:
        client.infer("digits", np.zeros((1, 8, 8)))


def test_32_concurrent_clients_under_load_get_their_own_rows(served, splits):
    url = served["url"]
    images = splits["test"]["image"]
    direct = Predictor.from_workdir(served["workdir"]).predict(images)["class"]
    with Client(url, token=TOKEN) as c:
        before = c.metrics()

    async def main():
        async with AsyncClient(url, token=TOKEN, timeout_s=60) as client:
            async def worker(w):
                got = []
                for r in range(6):
                    start = (w * 7 + r * 3) % (len(images) - 2)
                    n = 1 + (w + r) % 2  # at most 64 rows queued at once: the queue's limit
                    out = await client.infer("digits", images[start:start + n], request_id=f"{w}-{r}")
                    got.append((start, n, out))
                return got
            return await asyncio.gather(*(worker(w) for w in range(32)))

    results = asyncio.run(asyncio.wait_for(main(), timeout=120))
    rows = 0
    for w, got in enumerate(results):
        for r, (start, n, out) in enumerate(got):
            assert out["id"] == f"{w}-{r}"
            np.testing.assert_array_equal(out["class"], direct[start:start + n])
            rows += n
    with Client(url, token=TOKEN) as c:
        after = c.metrics()
    assert metric(after, "lepton_requests_total", code="200") - metric(before, "lepton_requests_total",
                                                                        code="200") == 32 * 6
    executed = sum(metric(after, "lepton_replica_rows_total", replica=r) - metric(before, "lepton_replica_rows_total",
                                                                                  replica=r)
                   for r in re.findall(r'lepton_replica_rows_total\{model="digits",replica="([^"]+)"', after))
    assert executed == rows  # no row lost or run twice
    assert metric(after, "lepton_batch_size_sum") - metric(before, "lepton_batch_size_sum") == rows
    batches = metric(after, "lepton_batch_size_count") - metric(before, "lepton_batch_size_count")
    assert 0 < batches <= 32 * 6
    assert metric(after, "lepton_request_latency_seconds_count") > metric(before,
                                                                          "lepton_request_latency_seconds_count")
    assert metric(after, "lepton_queue_time_seconds_count") > metric(before, "lepton_queue_time_seconds_count")
    assert "lepton_replica_inflight_rows" in after and "lepton_queue_depth_rows" in after


def test_drift_gauges(served, splits, caplog):
    url = served["url"]
    reference = served["server"].deployments["digits"].model.reference
    held_out = splits["test"]["image"]
    report = drift_report(reference, held_out, Predictor.from_workdir(served["workdir"]).predict(held_out)["class"])
    assert report["max_group"] < 0.1 and report["predictions"] < 0.1
    shifted = np.roll(held_out, 3, axis=2)  # digits moved 3 pixels to the right
    drift = served["server"].deployments["digits"].drift

    def settled(client, seen):  # the background task has folded everything served into the window
        deadline = time.monotonic() + 30
        while (drift.observed < seen + 256 or drift._pending or drift.age_s > 1.0) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        return client.metrics()

    with Client(url, token=TOKEN) as client:
        seen = drift.observed
        for start in range(0, 256, 32):
            client.infer("digits", held_out[start:start + 32])
        calm = settled(client, seen)
        with caplog.at_level(logging.WARNING, logger="lepton_jax.serve.drift"):
            for start in range(0, 256, 32):
                client.infer("digits", shifted[start:start + 32])
            drifted = settled(client, seen + 256)
    assert metric(drifted, "lepton_drift_window_examples") == 256  # the count window
    assert 0 <= metric(drifted, "lepton_drift_age_seconds") < 5
    groups = ["r0c0", "r0c1", "r1c0", "r1c1"]
    assert max(metric(calm, "lepton_input_drift_psi", group=g) for g in groups) < 0.1
    assert metric(calm, "lepton_prediction_drift_psi") < 0.1
    assert max(metric(drifted, "lepton_input_drift_psi", group=g) for g in groups) > 0.25
    assert any("drift on input" in r.getMessage() for r in caplog.records)


def test_more_replicas_than_devices_share_them_round_robin_with_a_warning(served, caplog):
    model, devices = served["server"].deployments["digits"].model, jax.devices()
    with caplog.at_level(logging.WARNING, logger="lepton_jax.serve"):
        assert [r.name for r in model.make_replicas(2, devices[:2])] == ["0:cpu0", "1:cpu1"]
        assert not caplog.records
        assert [r.name for r in model.make_replicas(3, devices[:1])] == ["0:cpu0", "1:cpu0", "2:cpu0"]
    assert len(caplog.records) == 1, "no warning that replicas share a device"
    message = caplog.records[0].getMessage()
    assert "3 replicas of digits on 1 device(s)" in message and "share devices round robin" in message
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=N" in message


def test_queue_overflow_gives_429_not_a_hang(served, splits):
    url, server = served["url"], served["server"]
    replicas = server.deployments["digits"].batcher.replicas
    gate = threading.Event()
    for replica in replicas:  # occupy each replica's worker thread: the device is "busy"
        replica.executor.submit(gate.wait, 60)
    total = CONFIG.max_queue_rows + 2 * CONFIG.max_batch_size + 40
    row = splits["test"]["image"][:1]

    async def main():
        async with AsyncClient(url, token=TOKEN, timeout_s=60, max_connections=total) as client:
            async def one():
                try:
                    await client.infer("digits", row)
                    return 200
                except ServerError as e:
                    assert e.status == 429 and "retry later" in e.message
                    return 429
            tasks = [asyncio.ensure_future(one()) for _ in range(total)]
            while sum(t.done() for t in tasks) < total - CONFIG.max_queue_rows - 2 * CONFIG.max_batch_size:
                await asyncio.sleep(0.01)
            early = [t.result() for t in tasks if t.done()]
            gate.set()
            return early, await asyncio.gather(*tasks)

    try:
        early, statuses = asyncio.run(asyncio.wait_for(main(), timeout=120))
    finally:
        gate.set()
    assert set(early) == {429}
    assert statuses.count(429) >= total - CONFIG.max_queue_rows - 2 * CONFIG.max_batch_size
    assert statuses.count(200) + statuses.count(429) == total and statuses.count(200) > 0
    assert httpx.get(url + "/v2/health/ready", timeout=10).status_code == 200


def test_stock_tritonclient_binary_default_json_mode_and_gzip(served, splits):
    """NVIDIA's tritonclient[http], as users run it: defaults (binary tensors both ways), JSON mode, compression."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    rows = splits["test"]["image"][:24].reshape(-1, 8, 8, 1).astype(np.float32)
    direct = Predictor.from_workdir(served["workdir"]).predict(rows)
    labels = served["server"].deployments["digits"].model.label_names
    headers = served["headers"]
    client = triton.InferenceServerClient(served["url"].removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits", headers=headers)
        assert client.is_model_ready("digits", "1", headers=headers)
        assert "binary_tensor_data" in client.get_server_metadata(headers=headers)["extensions"]
        meta = client.get_model_metadata("digits", headers=headers)
        assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
        assert [o["name"] for o in meta["outputs"]] == ["probabilities", "class", "label"]
        config = client.get_model_config("digits", headers=headers)
        assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [8, 8, 1]
        assert config["instance_group"][0]["count"] == 2
        for mode in ("default", "json", "gzip", "int64"):
            data = rows.astype(np.int64) if mode == "int64" else rows
            tensor = triton.InferInput("image", list(data.shape), "INT64" if mode == "int64" else "FP32")
            tensor.set_data_from_numpy(data, binary_data=mode != "json")
            outputs = [triton.InferRequestedOutput(n, binary_data=False) for n in ("probabilities", "class", "label")]
            result = client.infer("digits", [tensor], request_id=f"r-{mode}", headers=dict(headers),  # it mutates them
                                  outputs=outputs if mode == "json" else None,
                                  request_compression_algorithm="gzip" if mode == "gzip" else None)
            response = result.get_response()
            assert response["id"] == f"r-{mode}" and response["model_version"] == "1"
            binary = [o["name"] for o in response["outputs"] if "binary_data_size" in o.get("parameters", {})]
            assert binary == ([] if mode == "json" else ["probabilities", "class", "label"]), mode
            np.testing.assert_allclose(result.as_numpy("probabilities"), direct["probability"], atol=1e-5)
            np.testing.assert_array_equal(result.as_numpy("class"), direct["class"])
            got = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
            assert got == [labels[c] for c in direct["class"]]
        bad = triton.InferInput("image", [2, 4, 8], "FP32")
        bad.set_data_from_numpy(np.zeros((2, 4, 8), np.float32))
        with pytest.raises(InferenceServerException, match=r"does not match the model; expected \[N, 8, 8, 1\]"):
            client.infer("digits", [bad], headers=dict(headers))
    finally:
        client.close()


def raw_http(url: str, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request written byte for byte on a fresh connection (for headers httpx will not send)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            if int(size, 16) == 0:
                break
            out, rest = out + rest[:int(size, 16)], rest[int(size, 16) + 2:]
        body = out
    return int(lines[0].split()[1]), headers, body


def test_malformed_requests_get_4xx_kserve_errors_and_the_server_stays_healthy(served):
    import gzip
    import zlib

    url, auth = served["url"], served["headers"]
    good = infer_request(np.zeros((1, 8, 8)))

    def inp(**changes):
        body = json.loads(json.dumps(good))
        body["inputs"][0].update(changes)
        return json.dumps(body).encode()

    def top(**changes):
        return json.dumps({**good, **changes}).encode()

    zeros = [0.0] * 64
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 256}}]}).encode()
    blob = np.zeros(64, np.float32).tobytes()

    def binary(json_part: bytes, data: bytes, length: str | None = None) -> tuple[bytes, dict[str, str]]:
        return json_part + data, {"Inference-Header-Content-Length": length or str(len(json_part))}

    def binary_input(**params):
        return json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP32",
                                       "parameters": params}]}).encode()

    infer = "/v2/models/digits/infer"
    cases: list[tuple[str, str, bytes | None, dict[str, str], str]] = [
        # (method, path, body, extra headers, what)  -- types
        ("POST", infer, inp(shape=[True, 8, 8]), {}, "bool in shape"),
        ("POST", infer, inp(shape=[1.0, 8, 8]), {}, "float in shape"),
        ("POST", infer, inp(shape="1,8,8"), {}, "string shape"),
        ("POST", infer, inp(shape=[-1, 8, 8]), {}, "negative size"),
        ("POST", infer, inp(shape=[[1], 8, 8]), {}, "nested shape"),
        ("POST", infer, inp(data=[True] * 64), {}, "bool data"),
        ("POST", infer, inp(data=[True] + zeros[1:]), {}, "one bool among numbers"),
        ("POST", infer, inp(data=None), {}, "null data"),
        ("POST", infer, inp(data={"a": 1}), {}, "object data"),
        ("POST", infer, inp(data=[[0.0] * 8] * 7 + [0.0] * 8), {}, "lists mixed with numbers"),
        ("POST", infer, inp(datatype="INT64", data=[0.5] * 64), {}, "fractions for INT64"),
        ("POST", infer, inp(datatype="INT64", data=[10 ** 30] * 64), {}, "integer overflow"),
        ("POST", infer, inp(datatype=None), {}, "no datatype"),
        ("POST", infer, inp(datatype="fp32"), {}, "lower-case datatype"),
        ("POST", infer, inp(datatype="BOOL", data=[False] * 64), {}, "BOOL input"),
        ("POST", infer, inp(name=None), {}, "no input name"),
        ("POST", infer, inp(name=7), {}, "numeric input name"),
        ("POST", infer, inp(name="pixels"), {}, "unknown input name"),
        ("POST", infer, top(inputs=[]), {}, "no inputs"),
        ("POST", infer, top(inputs={"name": "image"}), {}, "inputs not a list"),
        ("POST", infer, top(inputs=good["inputs"] * 2), {}, "two inputs"),
        ("POST", infer, b"[1, 2, 3]", {}, "top-level array"),
        ("POST", infer, b'"hello"', {}, "top-level string"),
        ("POST", infer, top(id=5), {}, "numeric id"),
        ("POST", infer, top(parameters=[1]), {}, "parameters not an object"),
        ("POST", infer, top(outputs=[{"name": "logits"}]), {}, "unknown output"),
        ("POST", infer, top(outputs="class"), {}, "outputs not a list"),
        # shapes and values
        ("POST", infer, inp(shape=[1, 8, 8, 1, 1, 1, 1, 1, 1]), {}, "rank 9"),
        ("POST", infer, inp(shape=[0, 8, 8], data=[]), {}, "zero rows"),
        ("POST", infer, inp(shape=[10 ** 12, 8, 8]), {}, "a trillion rows"),
        ("POST", infer, inp(data=zeros[:63]), {}, "63 values for 64"),
        ("POST", infer, json.dumps(good).replace("0.0", "NaN", 1).encode(), {}, "NaN"),
        ("POST", infer, json.dumps(good).replace("0.0", "-Infinity", 1).encode(), {}, "-Infinity"),
        ("POST", infer, inp(data=[-1.0] * 64), {}, "out of range"),
        # depth and size
        ("POST", infer, b"[" * 100_000 + b"]" * 100_000, {}, "100,000 levels deep"),
        ("POST", infer, b"[" * 5_000 + b"]" * 5_000, {}, "5,000 levels deep (within the size limit)"),
        ("POST", infer, inp(data=[[[[[[[[[[[0.0] * 64]]]]]]]]]]), {}, "data nested 11 deep"),
        ("POST", infer, b'{"a":' * 3000 + b"1" + b"}" * 3000, {}, "deep objects"),
        ("POST", infer, b"{" + b" " * 70_000 + b"}", {}, "over the body limit"),
        ("POST", infer, b"", {}, "empty body"),
        # encodings
        ("POST", infer, b'{"inputs": "\xff\xfe"}', {}, "invalid UTF-8"),
        ("POST", infer, json.dumps(good).encode("utf-16"), {}, "UTF-16"),
        ("POST", infer, json.dumps(good).encode(), {"Content-Encoding": "br"}, "brotli"),
        ("POST", infer, b"not gzip at all", {"Content-Encoding": "gzip"}, "broken gzip"),
        ("POST", infer, gzip.compress(json.dumps(good).encode())[:-12], {"Content-Encoding": "gzip"}, "cut gzip"),
        ("POST", infer, zlib.compress(b" " * 5_000_000), {"Content-Encoding": "deflate"}, "deflate bomb"),
        # paths and methods
        ("GET", "/nope", None, {}, "unknown route"),
        ("GET", "/v2/models/digits/infer", None, {}, "GET on infer"),
        ("POST", "/v2/health/live", b"{}", {}, "POST on a probe"),
        ("DELETE", "/v2/models/digits", None, {}, "DELETE on metadata"),
        ("POST", "/v2/models/nope/infer", json.dumps(good).encode(), {}, "unknown model"),
        ("POST", "/v2/models/digits/versions/9/infer", json.dumps(good).encode(), {}, "unknown version"),
        ("GET", "/v2/models/nope/config", None, {}, "config of an unknown model"),
        ("GET", "/v2/models/digits/versions/9/ready", None, {}, "readiness of an unknown version"),
        # the binary tensor extension
        ("POST", infer, *binary(header, blob, "abc"), "non-numeric header length"),
        ("POST", infer, header + blob, {"Inference-Header-Content-Length": b"\xb2"}, "header length '\u00b2'"),
        ("POST", infer, *binary(header, blob, "9" * 5000), "a 5,000-digit header length"),
        ("POST", infer, *binary(header, blob, str(len(header) + 10_000)), "header length past the body"),
        ("POST", infer, *binary(header, blob + b"\0" * 4), "extra binary bytes"),
        ("POST", infer, *binary(header, blob[:-4]), "short binary data"),
        ("POST", infer, *binary(binary_input(binary_data_size=True), blob), "bool binary_data_size"),
        ("POST", infer, *binary(binary_input(binary_data_size=-4), blob), "negative binary_data_size"),
        ("POST", infer, *binary(header, blob, str(len(header) - 5)), "header length cuts the JSON"),
        ("POST", infer, *binary(json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8], "datatype": "FP32",
                                                        "data": zeros, "parameters": {"binary_data_size": 256}}]}
                                           ).encode(), blob), "both data and binary"),
        ("POST", infer, *binary(json.dumps({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                                        "parameters": {"binary_data_size": 6}}]}).encode(),
                                b"\x09\0\0\0ab"), "BYTES element past its end"),
        ("POST", infer, *binary(inp(), b""), "binary header but no binary input... and no bytes"),
    ]
    cases[-1] = ("POST", infer, *binary(binary_input(), blob), "neither data nor binary_data_size")
    with Client(url, token=TOKEN) as c:
        before = c.metrics()
    failures = []
    with httpx.Client(base_url=url, headers=auth, timeout=30) as http:
        for method, path, body, headers, what in cases:
            response = http.request(method, path, content=body, headers=headers)
            error = response.json().get("error") if response.headers.get("content-type") == "application/json" \
                else None
            if not (400 <= response.status_code < 500 and isinstance(error, str) and error):
                failures.append((what, response.status_code, response.text[:200]))
        # a Content-Length that is not a number, and a chunked body over the limit, sent byte for byte
        status, headers, body = raw_http(url, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                                              b"Authorization: Bearer " + TOKEN.encode() + b"\r\nTransfer-Encoding: "
                                              b"chunked\r\n\r\n" + b"%x\r\n" % 80_000 + b"[" * 80_000
                                              + b"\r\n0\r\n\r\n")
        assert status == 413 and "exceeds the limit" in json.loads(body)["error"]
        assert len(cases) >= 60 and not failures, failures
        assert http.get("/v2/health/ready").status_code == 200  # still healthy
        assert http.post(infer, json=good).status_code == 200
        full = infer_request(np.zeros((65, 8, 8)))
    with Client(url, token=TOKEN) as c:
        after = c.metrics()
    def server_errors(text):
        return sum(float(v) for v in re.findall(r'^lepton_requests_total\{[^}]*code="5\d\d"\} (\S+)', text, re.M))
    assert server_errors(after) == server_errors(before)  # (the 503 before warm-up is the fixture's)
    assert sum(float(v) for v in re.findall(r"^lepton_errors_total\{[^}]*\} (\S+)", after, re.M)) - \
        sum(float(v) for v in re.findall(r"^lepton_errors_total\{[^}]*\} (\S+)", before, re.M)) == len(cases) + 1
    del full


def test_429_carries_retry_after_and_a_request_that_never_fits_gets_413(served):
    dep = served["server"].deployments["digits"]
    assert dep.max_rows == min(CONFIG.max_request_rows, CONFIG.max_queue_rows) == 64
    assert dep.body_limit == 64 * 1024  # configured here; derived when not (see test_derived_body_limit)
    response = httpx.post(served["url"] + "/v2/models/digits/infer", headers=served["headers"], timeout=10,
                          json=infer_request(np.zeros((65, 8, 8)).round()))
    assert response.status_code == 413 and "split the request" in response.json()["error"]
    gate = threading.Event()
    for replica in dep.batcher.replicas:
        replica.executor.submit(gate.wait, 60)
    try:
        async def flood():
            async with httpx.AsyncClient(headers=served["headers"], timeout=60) as http:
                body = infer_request(np.zeros((16, 8, 8)))
                return await asyncio.gather(*(http.post(served["url"] + "/v2/models/digits/infer", json=body)
                                              for _ in range(12)))
        task = threading.Thread(target=lambda: results.extend(asyncio.run(flood())))
        results: list[httpx.Response] = []
        task.start()
        deadline = time.monotonic() + 60
        refusals = metric(served["server"].metrics.render().decode(), "lepton_errors_total", kind="queue_full")
        while time.monotonic() < deadline:  # at most 2 batches held by the replicas + 4 queued (64 rows)
            text = served["server"].metrics.render().decode()
            if metric(text, "lepton_errors_total", kind="queue_full") - refusals >= 6:
                break
            time.sleep(0.01)
    finally:
        gate.set()
    task.join(timeout=60)
    refused = [r for r in results if r.status_code == 429]
    assert refused and all(r.headers["retry-after"] == "1" and "retry later" in r.json()["error"] for r in refused)
    statuses = [r.status_code for r in results]  # at most 6 fit; at least 4 (the queue's 64 rows) are taken
    assert statuses.count(429) >= 6 and statuses.count(200) >= 4 and len(statuses) == 12


def test_derived_body_limit():
    from lepton_jax.serve.server import JSON_BYTES_PER_VALUE

    class Model:
        cells = 64
    limit = ServedModel.body_limit(Model(), ServeConfig(max_request_rows=1024, max_queue_rows=4096))
    assert limit == 1024 * 64 * JSON_BYTES_PER_VALUE + 65536  # ~1.7 MB, not a fixed 4 MB
    biggest = json.dumps(infer_request(np.full((1024, 8, 8), -1.2345678901234567e-05, np.float64)))
    assert len(biggest) < limit


def test_default_json_answer_matches_the_general_encoder_and_keeps_float32_exactly():
    """The common answer (all outputs, JSON) takes a short path; it must say exactly what the general one says."""
    from lepton_jax.serve.kserve import InferRequest, Tensor, encode_response

    probabilities = np.random.default_rng(0).dirichlet(np.ones(10), 3).astype(np.float32)
    labels = np.empty(3, object)
    labels[:] = [b"7", b"3", "\u00e9t\u00e9".encode()]
    outputs = [Tensor("probabilities", "FP32", [3, 10], probabilities),
               Tensor("class", "INT64", [3], probabilities.argmax(-1)), Tensor("label", "BYTES", [3], labels)]
    short, short_headers = encode_response(InferRequest([]), outputs, model_name="m", model_version="2")
    asked = InferRequest([], outputs=[{"name": o.name} for o in outputs])
    general, general_headers = encode_response(asked, outputs, model_name="m", model_version="2")
    assert json.loads(short) == json.loads(general) and dict(short_headers) == dict(general_headers)
    doc = json.loads(short)
    assert np.array_equal(np.asarray(doc["outputs"][0]["data"], np.float32).reshape(3, 10), probabilities)
    assert doc["outputs"][2]["data"] == ["7", "3", "\u00e9t\u00e9"]


def test_json_the_fast_parser_refuses_still_gets_the_precise_error():
    """orjson refuses NaN/Infinity literals and numbers that overflow a double; the standard library then parses
    them, so the caller hears which rows are not finite instead of "not valid JSON"."""
    from lepton_jax.serve.kserve import InputSpec, RequestError, decode_rows

    spec = InputSpec("m", "image", (2,), (0.0, 16.0))
    for literal in ("NaN", "Infinity", "1e400"):
        body = f'{{"inputs": [{{"name": "image", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, {literal}]}}]}}'
        with pytest.raises(RequestError, match=r"1 example\(s\) contain NaN or inf") as e:
            decode_rows(body.encode(), None, None, spec=spec, body_limit=1 << 16, max_rows=8)
        assert e.value.kind == "non_finite"
    with pytest.raises(RequestError, match="not valid JSON") as e:
        decode_rows(b'{"inputs": [1,]}', None, None, spec=spec, body_limit=1 << 16, max_rows=8)
    assert e.value.kind == "bad_json"
    _, rows = decode_rows(b'{"inputs": [{"name": "image", "shape": [1, 2], "datatype": "FP32", "data": [1, 2.5]}]}',
                          None, None, spec=spec, body_limit=1 << 16, max_rows=8)
    assert rows.dtype == np.float32 and rows.tolist() == [[1.0, 2.5]]


def test_a_large_request_is_decoded_and_answered_by_the_codec_worker_process(trained_run, splits):
    """300 rows: a body over 64 KiB (decoded in the worker process) and an answer of more than 256 rows (encoded
    there too); the classes are the predictor's."""
    from tests.serving import served_classes

    workdir, _ = trained_run
    images = splits["test"]["image"][:300]
    assert served_classes(ServedModel.from_workdir(workdir, name="digits"), images) == \
        Predictor.from_workdir(workdir).predict(images)["class"].tolist()


def test_codec_workers_run_below_the_servers_cpu_priority(served):
    """Large bodies are decoded in worker processes that the kernel schedules after the event loop (head-of-line)."""
    pool = served["server"]._pool
    worker_nice = pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result(timeout=30)
    worker_pid = pool.submit(os.getpid).result(timeout=30)
    assert worker_pid != os.getpid()  # a real process, not the thread fallback
    assert worker_nice == min(19, os.getpriority(os.PRIO_PROCESS, 0) + CONFIG.codec_niceness)


def test_graceful_drain_finishes_in_flight_requests(served, splits):
    """Last in this module: shuts the server down while requests are running; all of them complete."""
    url, server, uv = served["url"], served["server"], served["uvicorn"]
    gate = threading.Event()
    for replica in server.deployments["digits"].batcher.replicas:
        replica.executor.submit(gate.wait, 60)
    rows = splits["test"]["image"][:3]
    results = []

    def call():
        with Client(url, token=TOKEN, timeout_s=60) as client:
            results.append(client.infer("digits", rows)["class"])

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    batcher = server.deployments["digits"].batcher
    deadline = time.monotonic() + 30
    while sum(r.inflight_rows for r in batcher.replicas) + batcher.queued_rows < 18 and time.monotonic() < deadline:
        time.sleep(0.01)  # until all six requests are inside the server
    uv.should_exit = True  # like SIGTERM
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 6 and all((r == results[0]).all() for r in results)
    deadline = time.monotonic() + 30
    while not batcher.draining and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.draining and not server.ready
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/v2/health/live", timeout=5)
