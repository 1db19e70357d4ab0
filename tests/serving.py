"""A server for one test: a :class:`ModelServer` under uvicorn in a thread on 127.0.0.1, stopped when done."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import numpy as np
import uvicorn

from lepton_jax.serve.client import infer_request
from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel


def served_classes(model: ServedModel, rows: np.ndarray, *, timeout_s: float = 60.0) -> list[int]:
    """Serves ``model`` until it is ready, posts ``rows`` to its v2 infer endpoint and returns the answered classes."""
    server = ModelServer([model], ServeConfig(max_batch_size=8, replicas=1, warm_up_on_startup=True))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # log_config=None: uvicorn adds no log handlers bound to the test's (captured, later closed) stderr
    uv = uvicorn.Server(uvicorn.Config(server.app, log_config=None, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not uv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server never started"
            time.sleep(0.01)
        while httpx.get(f"{url}/v2/health/ready", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.05)
        response = httpx.post(f"{url}/v2/models/{model.name}/infer", json=infer_request(rows), timeout=30)
        assert response.status_code == 200, response.text
        return {o["name"]: o["data"] for o in response.json()["outputs"]}["class"]
    finally:
        uv.should_exit = True
        thread.join(timeout=60)
