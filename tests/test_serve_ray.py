"""The Ray Serve deployment on a local single-node Ray instance (127.0.0.1), started and stopped here."""

import json
import os
import time

import httpx
import jax
import numpy as np
import pytest

from lepton_jax.serve import Predictor
from lepton_jax.serve.client import infer_request
from lepton_jax.serve.registry import Registry
from lepton_jax.serve.server import ServeConfig
from tests.serving import register_variant, unused_port


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:os.fork:RuntimeWarning")
def test_ray_serve_deployment_answers_kserve_v2_like_the_predictor(trained_run, tmp_path):
    ray = pytest.importorskip("ray")
    import tritonclient.http as triton
    from ray import serve

    from lepton_jax.serve.ray_serve import application

    registry = Registry(tmp_path / "lake")
    registry.promote("digits", registry.register("digits", trained_run[0]).version)
    port = unused_port()  # Ray starts many processes before its proxy binds it
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(max_batch_size=8, max_delay_ms=5.0, replicas=2, max_request_rows=64, follow=True,
                             follow_interval_s=0.1)
        serve.run(application(tmp_path / "lake", ["digits@production"], config, num_cpus=0.5), name="lepton_jax",
                  route_prefix="/")
        replicas = serve.status().applications["lepton_jax"].deployments["KServeReplica"].replica_states
        assert replicas.get("RUNNING") == 2
        data = json.loads((trained_run[0] / "run.json").read_text())["data"]
        from lepton_jax.lake import Lake

        rows = Lake(data["lake"]).table(data["table"], data["version"]).reader("test").read_all()["image"][:48]
        direct = Predictor.from_workdir(trained_run[0]).predict(rows)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v2/health/ready", timeout=30).status_code == 200
        with httpx.Client(base_url=url, timeout=60) as http:
            got = [http.post("/v2/models/digits/infer", json=infer_request(rows[i:i + 3], request_id=str(i)))
                   for i in range(0, 48, 3)]
            assert http.post("/v2/models/digits/infer", json={"inputs": [{"name": "image", "shape": [True, 8, 8],
                                                                          "datatype": "FP32", "data": [0] * 64}]}
                             ).json()["error"].startswith("input 'image': shape [True, 8, 8]")
            assert http.get("/v2/nope").json()["error"].startswith("no endpoint")
        for i, response in zip(range(0, 48, 3), got, strict=True):
            assert response.status_code == 200 and response.json()["id"] == str(i)
            out = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]}
            np.testing.assert_array_equal(out["class"], direct["class"][i:i + 3])
            np.testing.assert_allclose(out["probabilities"], direct["probability"][i:i + 3], atol=1e-5)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = triton.InferInput("image", [48, 8, 8, 1], "FP32")
        tensor.set_data_from_numpy(rows.reshape(48, 8, 8, 1).astype(np.float32))  # binary, tritonclient's default
        result = client.infer("digits", [tensor])
        np.testing.assert_array_equal(result.as_numpy("class"), direct["class"])
        client.close()

        # both replicas follow digits@production: a promotion is answered by the new version, and every answer on
        # the way is the classes of the version it names
        v2 = register_variant(registry, registry.get("digits", 1), seed=1)
        offline = {"1": direct["class"], "2": Predictor.from_registry(v2, devices=jax.devices()[:1]).predict(rows)[
            "class"]}
        registry.promote("digits", v2.version)
        answered, deadline = [], time.monotonic() + 120
        with httpx.Client(base_url=url, timeout=60) as http:
            while answered[-20:] != ["2"] * 20:  # 20 in a row over Ray's two replicas
                assert time.monotonic() < deadline, answered[-40:]
                i = len(answered) % 16 * 3
                doc = http.post("/v2/models/digits/infer", json=infer_request(rows[i:i + 3])).json()
                answered.append(doc["model_version"])
                assert doc["outputs"][1]["data"] == offline[doc["model_version"]][i:i + 3].tolist()
    finally:
        serve.shutdown()
        ray.shutdown()
