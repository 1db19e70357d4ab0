"""`lepton-jax serve --follow` as a process under load: promotions, a rollback and a corrupt candidate while 64
connections keep sending; no request fails, every answer names the version that computed it, and it is right."""

import asyncio
import logging
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orjson
import pytest

from lepton_jax.lake import Lake
from lepton_jax.serve import Predictor, loadgen
from lepton_jax.serve.client import infer_request
from lepton_jax.serve.registry import Registry
from tests.serving import corrupt_params, register_variant

TOTAL, CONCURRENCY, ROUND, BETWEEN = 20000, 64, 2000, 1500  # requests; connections; per drive; answers per phase
ROWS = 2  # per request
_VERSION = re.compile(rb'"model_version":"(\d+)"')


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def start_following_server(lake, log_path, interval_s: float) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lepton_jax.cli", "serve", "--lake", str(lake), "--model",
                                 "digits@production", "--port", str(port), "--max-queue-rows", "4096",
                                 "--follow", "--follow-interval-s", str(interval_s), "--drain-grace-s", "0",
                                 "--log-level", "info"], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return proc, port


async def get(port: int, path: str) -> loadgen.Outcome:
    return (await loadgen.drive("127.0.0.1", port, lambda i: loadgen.http_request("GET", path), 1, 1,
                                keep_body=True))[0]


@pytest.mark.slow
def test_following_server_swaps_versions_under_load_without_a_failed_request(trained_run, tmp_path):
    """3 promotions, 1 rollback (a promotion of the previous version) and then a corrupt candidate, while >= 20,000
    2-row requests at concurrency 64 run. Every request answers 200 with the classes offline ``Predictor.predict``
    of the version it names gives; readiness (polled throughout) never says 503; the corrupt version is refused
    with one log line and counted, and the version before it keeps answering.

    Which versions may answer a request [start, end]: version v of phase k (promoted at p_k) may answer if the
    request ended after p_k -- never before its promotion -- and started before the first answer from phase k+1's
    version ended (a following server polls, loads and warms before it swaps, so the old version answers until
    then; once the new one has answered anyone, no later request gets the old one)."""
    lake = tmp_path / "lake"
    registry = Registry(lake)
    v1 = registry.register("digits", trained_run[0])
    for seed in (1, 2, 3):
        register_variant(registry, v1, seed=seed)
    bad = register_variant(registry, v1, seed=4)
    corrupt_params(bad)
    registry.promote("digits", 1)
    schedule = [2, 3, 2, 4, bad.version]  # promotions 2, 3; the rollback to 2; promotion 4; the corrupt candidate
    served_order = [1, 2, 3, 2, 4]  # the corrupt one is refused

    data = registry.get("digits", 1).record["data"]
    pool = Lake(data["lake"]).table(data["table"], data["version"]).reader("test").read_all()["image"][:256]
    pairs = len(pool) // ROWS
    bodies = [loadgen.http_request("POST", "/v2/models/digits/infer",
                                   orjson.dumps(infer_request(pool[i * ROWS:(i + 1) * ROWS])),
                                   {"Content-Type": "application/json"}) for i in range(pairs)]
    offline = {v: Predictor.from_registry(registry.get("digits", v), devices=jax.devices()[:1]).predict(pool)["class"]
               for v in (1, 2, 3, 4)}
    for a, b in zip(served_order, served_order[1:], strict=False):  # the class check tells versions apart
        assert (offline[a] != offline[b]).mean() > 0.05, (a, b)

    proc, port = start_following_server(lake, tmp_path / "server.log", interval_s=0.05)
    outcomes: list[loadgen.Outcome] = []
    first_seen: dict[int, list[tuple[float, float]]] = {}  # version -> (start, end) of its answers, as they come
    events: list[tuple[int, float, float]] = []  # (version, promote start, promote end)
    readiness: list[int] = []

    answered = [0]

    def seen(outcome: loadgen.Outcome) -> None:
        answered[0] += 1
        if m := _VERSION.search(outcome.body[:200]):
            first_seen.setdefault(int(m[1]), []).append((outcome.start, outcome.end))

    async def main() -> None:
        deadline = time.monotonic() + 180
        while True:  # start-up: until ready
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if (await get(port, "/v2/health/ready")).status == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        done = asyncio.Event()

        async def load() -> None:
            while not done.is_set() or len(outcomes) < TOTAL:
                offset = len(outcomes)
                outcomes.extend(await loadgen.drive("127.0.0.1", port, lambda i, at=offset: bodies[(at + i) % pairs],
                                                    ROUND, CONCURRENCY, keep_body=True, on_response=seen))

        async def probe() -> None:
            while not done.is_set() or len(outcomes) < TOTAL:
                readiness.append((await get(port, "/v2/health/ready")).status)
                await asyncio.sleep(0.02)

        async def promote() -> None:
            for version in schedule:
                mark = answered[0]
                while answered[0] < mark + BETWEEN:
                    await asyncio.sleep(0.01)
                start = time.perf_counter()
                await asyncio.to_thread(registry.promote, "digits", version)
                events.append((version, start, time.perf_counter()))
                limit = time.monotonic() + 60
                if version == bad.version:
                    while metric((await get(port, "/metrics")).body.decode(), "lepton_model_swaps_failed_total") < 1:
                        assert time.monotonic() < limit, "the corrupt version was never refused"
                        await asyncio.sleep(0.05)
                else:
                    while not any(s > events[-1][2] for s, _ in first_seen.get(version, [])):
                        assert time.monotonic() < limit, f"version {version} never answered"
                        await asyncio.sleep(0.01)
            mark = answered[0]
            while answered[0] < mark + BETWEEN:  # the corrupt candidate's phase under load
                await asyncio.sleep(0.01)
            done.set()

        await asyncio.gather(load(), probe(), promote())

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=300))
        final_metrics = asyncio.run(get(port, "/metrics")).body.decode()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    log = (tmp_path / "server.log").read_text()

    # nothing failed or was dropped; readiness answered 200 every time
    assert len(outcomes) >= TOTAL and {(o.status, o.error) for o in outcomes} == {(200, None)}, \
        [(o.status, o.error, o.body[:200]) for o in outcomes if o.status != 200][:3]
    assert readiness and set(readiness) == {200}, readiness
    # each answer: the classes of the version it names, for the rows sent
    versions = []
    for i, outcome in enumerate(outcomes):
        doc = orjson.loads(outcome.body)
        version, pair = int(doc["model_version"]), i % pairs
        classes = next(o["data"] for o in doc["outputs"] if o["name"] == "class")
        assert classes == offline[version][pair * ROWS:(pair + 1) * ROWS].tolist(), (i, version)
        versions.append(version)
    # ... and a version that held the stage during the request (see the docstring)
    assert [v for v, _, _ in events] == schedule
    good = [(v, start, end) for v, start, end in events if v != bad.version]
    phases = [(1, -np.inf)] + [(v, start) for v, start, _ in good]
    assert [v for v, _ in phases] == served_order
    # phase k's version answers requests that start up to the first answer of phase k+1's (after its promotion)
    ends = [min(e for s, e in first_seen[v] if s > promoted) for v, _, promoted in good] + [np.inf]
    for outcome, version in zip(outcomes, versions, strict=True):
        assert any(version == v and outcome.end >= promoted and outcome.start <= until
                   for (v, promoted), until in zip(phases, ends, strict=True)), \
            (version, outcome.start, outcome.end, phases, ends)
    assert bad.version not in versions
    # the server's own account
    assert metric(final_metrics, "lepton_model_swaps_total", model="digits", role="stable") == 4
    assert metric(final_metrics, "lepton_model_swaps_failed_total", model="digits", role="stable") == 1
    assert metric(final_metrics, "lepton_model_version", model="digits", role="stable") == 4
    refused = [line for line in log.splitlines() if "refused version" in line]
    assert len(refused) == 1 and f"refused version {bad.version} (ParamsError" in refused[0] and "sha256" in \
        refused[0] and "still serving version 4" in refused[0], log[-3000:]
    lags = [until - promoted for (_, promoted), until in zip(phases[1:], ends[:-1], strict=True)]
    print(f"{len(outcomes)} requests, {len(readiness)} readiness probes; promotion to first answer of the new "
          f"version: {', '.join(f'{lag:.2f}' for lag in lags)} s")


def test_canary_shadow_and_a_changed_label_set(trained_run, tmp_path, caplog):
    """In one process: a 25% canary answers exactly every 4th unversioned request (and its versioned path), the
    shadow mirrors every stable answer and counts its top-1 agreement without answering, per-version counters add
    up, and a version whose label names changed is refused at its stage (one line, counted) while the canary
    version before it keeps answering."""
    import httpx

    from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel
    from tests.serving import running

    lake = tmp_path / "lake"
    registry = Registry(lake)
    v1 = registry.register("digits", trained_run[0])
    v2 = register_variant(registry, v1, seed=1)
    renamed = {**v1.record, "data": {**v1.record["data"], "schema": {
        **v1.schema, "label_names": [f"digit {n}" for n in v1.schema["label_names"]]}}}
    v3 = registry.add("digits", {k: v for k, v in renamed.items() if k not in ("format", "name", "version", "time")})
    registry.promote("digits", v1.version)
    registry.promote("digits", v2.version, "staging")
    data = v1.record["data"]
    rows = Lake(data["lake"]).table(data["table"], data["version"]).reader("test").read_all()["image"][:40]
    offline = {v: Predictor.from_registry(registry.get("digits", v), devices=jax.devices()[:1]).predict(rows)["class"]
               for v in (1, 2)}
    assert (offline[1] != offline[2]).any()  # the versions differ on these rows
    config = ServeConfig(max_batch_size=4, codec_processes=0, canary="staging:25", shadow="staging", follow=True,
                         follow_interval_s=0.05)
    server = ModelServer([ServedModel.from_registry(lake, "digits@production")], config)
    with running(server) as url, httpx.Client(base_url=url, timeout=30) as http, \
            caplog.at_level(logging.INFO, logger="lepton_jax.serve"):
        answers = [http.post("/v2/models/digits/infer", json=infer_request(rows[i:i + 1])).json() for i in range(40)]
        assert [a["model_version"] for a in answers] == ["1", "1", "1", "2"] * 10
        for i, a in enumerate(answers):
            assert a["outputs"][1]["data"] == [int(offline[int(a["model_version"])][i])], i
        assert http.post("/v2/models/digits/versions/2/infer", json=infer_request(rows[:1])).json()[
            "model_version"] == "2"
        binary = http.post("/v2/models/digits/versions/2/infer",  # binary tensors: the version in the JSON header
                           json={**infer_request(rows[:1]), "parameters": {"binary_data_output": True}})
        header = orjson.loads(binary.content[:int(binary.headers["inference-header-content-length"])])
        assert header["model_version"] == "2" and header["outputs"][1]["parameters"]["binary_data_size"] == 8
        missing = http.post("/v2/models/digits/versions/7/infer", json=infer_request(rows[:1]))
        assert missing.status_code == 404 and "serves version 1 and 2 (canary)" in missing.json()["error"]
        deadline = time.monotonic() + 30
        while metric(text := http.get("/metrics").text, "lepton_shadow_rows_total") < 30:  # mirrors run after answers
            assert time.monotonic() < deadline, text
            time.sleep(0.02)
        mirrored = [i for i in range(40) if i % 4 != 3]  # the stable answers, not the canary's
        assert metric(text, "lepton_shadow_agreed_rows_total", version="2") == \
            sum(offline[1][i] == offline[2][i] for i in mirrored)
        assert metric(text, "lepton_version_requests_total", version="1") == 30
        assert metric(text, "lepton_version_requests_total", version="2") == 12
        assert metric(text, "lepton_model_version", role="canary") == 2
        assert metric(text, "lepton_model_version", role="shadow") == 2

        registry.promote("digits", v3.version, "staging")  # canary and shadow follow staging: both refuse it
        while metric(text := http.get("/metrics").text, "lepton_model_swaps_failed_total", role="shadow") < 1 or \
                metric(text, "lepton_model_swaps_failed_total", role="canary") < 1:
            assert time.monotonic() < deadline + 30, text
            time.sleep(0.02)
        time.sleep(0.3)  # several more polls: the refused version is not tried again
        answers = [http.post("/v2/models/digits/infer", json=infer_request(rows[:1])).json() for i in range(4)]
        assert {a["model_version"] for a in answers} == {"1", "2"}
        text = http.get("/metrics").text
    refusals = [r.getMessage() for r in caplog.records if "refused version" in r.getMessage()]
    assert len(refusals) == 2 and all(f"refused version {v3.version} (SwapError" in m and "label names" in m
                                      and "still serving version 2" in m for m in refusals), refusals
    assert metric(text, "lepton_model_swaps_failed_total", role="canary") == 1
    assert metric(text, "lepton_model_swaps_total") == 0


def test_follow_on_an_s3_lake(trained_run, s3_env):
    """The registry on an object store (the local S3 server): a promotion there is followed, and the server's
    metadata and answers name the new version."""
    import httpx

    from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel
    from tests.serving import running

    root = s3_env.new_root()
    registry = Registry(root)
    v1 = registry.register("digits", trained_run[0])
    v2 = register_variant(registry, v1, seed=1)
    registry.promote("digits", v1.version)
    server = ModelServer([ServedModel.from_registry(root, "digits@production")],
                         ServeConfig(max_batch_size=2, codec_processes=0, follow=True, follow_interval_s=0.05))
    body = infer_request(np.zeros((1, 8, 8)))
    with running(server) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.post("/v2/models/digits/infer", json=body).json()["model_version"] == "1"
        registry.promote("digits", v2.version)
        deadline = time.monotonic() + 60
        while http.post("/v2/models/digits/infer", json=body).json()["model_version"] != "2":
            assert time.monotonic() < deadline, http.get("/metrics").text
            time.sleep(0.05)
        meta = http.get("/v2/models/digits").json()
        assert meta["versions"] == ["2"] and meta["parameters"]["registry"] == "digits@2"
        assert meta["parameters"]["stage"] == "production"
        assert metric(http.get("/metrics").text, "lepton_model_swaps_total", role="stable") == 1


def test_a_request_that_took_the_old_version_finishes_on_it_after_the_swap(trained_run, tmp_path):
    """A client sends half its body, the stage moves and the server swaps to the new version, then the rest of the
    body arrives (longer after the swap than ``drain_timeout_s``): the request is answered 200 by the version that
    took it, which waited for it before draining (old code: 503 once drain_timeout_s passed)."""
    import httpx

    from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel
    from tests.serving import running

    registry = Registry(tmp_path / "lake")
    v1 = registry.register("digits", trained_run[0])
    v2 = register_variant(registry, v1, seed=1)
    registry.promote("digits", v1.version)
    data = v1.record["data"]
    rows = Lake(data["lake"]).table(data["table"], data["version"]).reader("test").read_all()["image"][:8]
    expected = Predictor.from_registry(v1, devices=jax.devices()[:1]).predict(rows)["class"].tolist()
    server = ModelServer([ServedModel.from_registry(tmp_path / "lake", "digits@production")],
                         ServeConfig(max_batch_size=2, codec_processes=0, follow=True, follow_interval_s=0.05,
                                     drain_timeout_s=0.3))
    body = orjson.dumps(infer_request(rows))
    with running(server) as url, httpx.Client(base_url=url, timeout=30) as http:
        slow = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        slow.sendall(f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        time.sleep(0.2)  # the server has taken the request (and version 1) and waits for the rest of the body
        registry.promote("digits", v2.version)
        deadline = time.monotonic() + 60
        while http.post("/v2/models/digits/infer", json=infer_request(rows[:1])).json()["model_version"] != "2":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)  # well past drain_timeout_s after the swap
        slow.sendall(body[100:])
        slow.settimeout(30)
        response = b""
        while b"\r\n\r\n" not in response or len(response.split(b"\r\n\r\n", 1)[1]) < int(
                re.search(rb"content-length: (\d+)", response.lower())[1]):
            response += slow.recv(65536)
        slow.close()
    head, answer = response.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), response[:500]
    doc = orjson.loads(answer)
    assert doc["model_version"] == "1" and doc["outputs"][1]["data"] == expected


def test_follow_latest(trained_run, tmp_path):
    """``digits@latest`` under --follow serves each newly registered version (no promotion needed)."""
    import httpx

    from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel
    from tests.serving import running

    registry = Registry(tmp_path / "lake")
    v1 = registry.register("digits", trained_run[0])
    server = ModelServer([ServedModel.from_registry(tmp_path / "lake", "digits@latest")],
                         ServeConfig(max_batch_size=2, codec_processes=0, follow=True, follow_interval_s=0.05))
    body = infer_request(np.zeros((1, 8, 8)))
    with running(server) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.post("/v2/models/digits/infer", json=body).json()["model_version"] == "1"
        register_variant(registry, v1, seed=1)
        deadline = time.monotonic() + 60
        while http.post("/v2/models/digits/infer", json=body).json()["model_version"] != "2":
            assert time.monotonic() < deadline, http.get("/metrics").text
            time.sleep(0.05)
        assert http.get("/v2/models/digits").json()["parameters"]["stage"] == "latest"


@pytest.mark.parametrize("flags, message", [
    (["--canary", "staging"], "canary 'staging': expected STAGE:PERCENT with a percentage in (0, 100]"),
    (["--canary", "staging:0"], "canary 'staging:0': expected STAGE:PERCENT"),
    (["--follow", "--follow-interval-s", "0"], "--follow-interval-s must be positive, got 0.0"),
    (["--backend", "ray", "--shadow", "staging"], "--canary and --shadow need --backend uvicorn")])
def test_bad_lifecycle_flags_are_one_line(capsys, tmp_path, flags, message):
    from lepton_jax.cli import main

    assert main(["serve", "--lake", str(tmp_path / "lake"), "--model", "digits@production", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
