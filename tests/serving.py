"""A server for one test (a :class:`ModelServer` under uvicorn in a thread on 127.0.0.1, stopped when done), and
registry versions for servers to swap between."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import uvicorn

from lepton_jax.serve.client import infer_request
from lepton_jax.serve.registry import ModelVersion, Registry
from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel


def unused_port() -> int:
    """A 127.0.0.1 port for a server that binds it later (Ray Serve's proxy, a server subprocess): free now, and
    outside the kernel's ephemeral range and Ray's worker ports (10002-19999), so no process that asks for any free
    port (Ray's own gRPC servers and workers, other tests' clients) can take it in between, as port 0 could."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(20001, min(ephemeral_low, 32768)))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no unused port in 20000-32767 on 127.0.0.1")


def served_classes(model: ServedModel, rows: np.ndarray, *, timeout_s: float = 60.0) -> list[int]:
    """Serves ``model`` until it is ready, posts ``rows`` to its v2 infer endpoint and returns the answered classes."""
    server = ModelServer([model], ServeConfig(max_batch_size=8, replicas=1, warm_up_on_startup=True))
    with running(server, timeout_s=timeout_s) as url:
        response = httpx.post(f"{url}/v2/models/{model.name}/infer", json=infer_request(rows), timeout=30)
        assert response.status_code == 200, response.text
        return {o["name"]: o["data"] for o in response.json()["outputs"]}["class"]


@contextlib.contextmanager
def running(server: ModelServer, *, timeout_s: float = 60.0) -> Iterator[str]:
    """``server`` under uvicorn in a thread on a free 127.0.0.1 port, once ready: its URL; stopped afterwards."""
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
        yield url
    finally:
        uv.should_exit = True
        thread.join(timeout=60)


def register_variant(registry: Registry, base: ModelVersion, *, seed: int, noise: float = 0.5) -> ModelVersion:
    """A new version of ``base``'s model whose parameters are ``base``'s plus Gaussian noise (``noise`` x each leaf's
    standard deviation), registered with ``base``'s record otherwise: a distinct version that predicts differently."""
    import jax

    from lepton_jax.serve.lake_params import write_tree
    from lepton_jax.serve.predictor import Predictor

    params = Predictor.from_registry(base, devices=jax.devices()[:1]).params
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(jax.device_get(params))
    noisy = [np.asarray(a + noise * (float(np.std(a)) or 1.0) * rng.standard_normal(a.shape), a.dtype) for a in leaves]
    manifest = write_tree(registry.storage, registry.new_params_key(base.name), jax.tree.unflatten(treedef, noisy))
    fields = {k: v for k, v in base.record.items() if k not in ("format", "name", "version", "time")}
    return registry.add(base.name, {**fields, "params": manifest, "description": f"{base.ref} + noise {noise}"})


def corrupt_params(entry: ModelVersion) -> None:
    """Alters one stored parameter array of ``entry`` in place (valid zarr, so only the record's sha256 tells)."""
    import tensorstore as ts

    store = ts.open({"driver": "zarr3", "kvstore": entry.storage.kvstore(f"{entry.record['params']['key']}/0000")},
                    open=True).result()
    store.write(store.read().result() + 1).result()
