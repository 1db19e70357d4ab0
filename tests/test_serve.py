"""The HTTP server on a random 127.0.0.1 port: readiness, v2 inference, bad inputs, auth, metrics, load, 429, drift."""

import asyncio
import json
import logging
import re
import socket
import threading
import time

import httpx
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
