"""`lepton-jax serve --backend ray` as a process: SIGTERM shuts Ray Serve and the local Ray down in order (exit 0),
no Ray process outlives the command, the HTTP proxy listens on the given address only and the dashboard is off."""

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from lepton_jax.serve.client import infer_request
from lepton_jax.serve.registry import Registry
from tests.serving import unused_port


def tagged_processes(tag: str, session: int) -> list[int]:
    """Processes whose environment carries ``tag`` (inherited by everything Ray starts, even in a new session) or
    that run in ``session``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            ours = tag.encode() in (entry / "environ").read_bytes() or os.getsid(pid) == session
            if ours and "Z" not in (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]:  # zombies are gone
                found.append(pid)
        except (OSError, ProcessLookupError):
            pass
    return found


def listeners(pids: list[int]) -> set[tuple[str, int, str]]:
    """The listening TCP sockets of ``pids``: (address, port, process name)."""
    psutil = pytest.importorskip("psutil")
    out = set()
    for pid in pids:
        try:
            process = psutil.Process(pid)
            connections, name = process.net_connections(kind="inet"), process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out |= {(c.laddr.ip, c.laddr.port, name) for c in connections if c.status == psutil.CONN_LISTEN}
    return out


def loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too


@pytest.mark.slow
def test_ray_backend_sigterm_stops_in_order_and_leaves_nothing_behind(trained_run, tmp_path):
    """SIGTERM (what Kubernetes, systemd and docker send): exit 0 after serve.shutdown() and ray.shutdown(), no
    process of the run left 10 s later, no dashboard, and nothing the run starts -- the HTTP proxy, Ray's GCS, raylet,
    workers, agents -- listens beyond loopback except the one server Ray hard-codes to all interfaces (the old code
    aborted: rc -6, leaving Ray's agents behind; before the CLI ran Ray as one machine, its gRPC servers bound
    0.0.0.0/:: and its agents the machine's address)."""
    sig = signal.SIGTERM
    pytest.importorskip("ray")
    registry = Registry(tmp_path / "lake")
    registry.promote("digits", registry.register("digits", trained_run[0]).version)
    port = unused_port()  # Ray starts many processes before its proxy binds it
    tag = f"lepton-ray-test-{uuid.uuid4().hex}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "RAY_USAGE_STATS_ENABLED": "0",
           "LEPTON_TEST_TAG": tag}
    log_path = tmp_path / "ray.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lepton_jax.cli", "serve", "--backend", "ray", "--lake",
                                 str(tmp_path / "lake"), "--model", "digits@production", "--host", "127.0.0.1",
                                 "--port", str(port), "--num-cpus-per-replica", "0.5", "--max-batch-size", "4",
                                 "--log-level", "info"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    listening: set[tuple[str, int, str]] = set()
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            listening |= listeners(tagged_processes(tag, proc.pid))
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        answer = httpx.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=infer_request(np.zeros((2, 8, 8))),
                            timeout=60)
        assert answer.status_code == 200, answer.text[:300]
        running = tagged_processes(tag, proc.pid)
        assert len(running) > 3, running  # the driver, Ray's GCS, raylet, agents, the replica ...
        listening |= listeners(running)
        proc.send_signal(sig)
        status = proc.wait(timeout=120)
        deadline = time.monotonic() + 10
        while (survivors := tagged_processes(tag, proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for pid in tagged_processes(tag, proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert status == 0, (status, text[-3000:])
    assert not survivors, [(pid, Path(f"/proc/{pid}/cmdline").read_bytes()[:120]) for pid in survivors
                           if Path(f"/proc/{pid}").exists()]
    assert {ip for ip, p, _ in listening if p == port} == {"127.0.0.1"}, sorted(listening)  # the HTTP proxy
    # everything loopback but one listener Ray cannot bind there: each Serve replica's inter-deployment gRPC server,
    # bound to "[::]:0" unconditionally (ray/serve/_private/replica.py, Ray 2.60: `add_port_to_grpc_server(self._server,
    # "[::]:0")`); before the CLI ran Ray as one machine, its GCS, raylet, workers and agents were exposed too
    exposed = [entry for entry in listening if not loopback(entry[0])]
    assert len(listening) > 3 and len(exposed) <= 1, sorted(listening)  # one replica
    assert all(name.startswith("ray::ServeReplica") for _, _, name in exposed), sorted(listening)
    assert not [entry for entry in listening if entry[1] == 8265], sorted(listening)
    assert f"{sig.name}: shutting down" in text and "stopping Ray Serve and the local Ray" in text, text[-3000:]
