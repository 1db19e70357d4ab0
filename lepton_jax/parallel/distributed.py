"""Multi-process start-up and a local launcher.

``initialize()`` joins the processes of one job through ``jax.distributed.initialize``:

* with ``LEPTON_COORDINATOR`` / ``LEPTON_NUM_PROCESSES`` / ``LEPTON_PROCESS_ID`` set (the local launcher, or any
  scheduler you script), it connects explicitly;
* otherwise it calls ``jax.distributed.initialize()`` with no arguments, so JAX's own cluster detection (every kind
  JAX supports: SLURM, Open MPI, Kubernetes/GKE, Cloud TPU pods, ``JAX_COORDINATOR_ADDRESS``, ...) decides; where
  it finds no cluster a single process uses its local devices.

It returns at once when JAX is already initialised (by this function or by the caller), and treats a process whose
JAX backend is already in use (a notebook that touched devices first) as a single process.

CPU processes exchange collectives over gloo, so a multi-process job runs on one laptop for development and tests.
Call it before anything touches JAX devices.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import jax

COORDINATOR = "LEPTON_COORDINATOR"
NUM_PROCESSES = "LEPTON_NUM_PROCESSES"
PROCESS_ID = "LEPTON_PROCESS_ID"


def initialize(timeout_s: int = 300) -> bool:
    """Joins the multi-process job if there is one; returns True when ``jax.distributed`` is initialised."""
    if jax.distributed.is_initialized():
        return True
    with contextlib.suppress(AttributeError, KeyError, ValueError):  # gloo: CPU collectives across processes
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    coordinator = os.environ.get(COORDINATOR)
    try:
        if coordinator:
            jax.distributed.initialize(coordinator, num_processes=int(os.environ[NUM_PROCESSES]),
                                       process_id=int(os.environ[PROCESS_ID]), initialization_timeout=timeout_s)
        else:
            jax.distributed.initialize(initialization_timeout=timeout_s)
    except ValueError as e:  # JAX detected no cluster (no coordinator address): one process
        if coordinator or "coordinator_address" not in str(e):
            raise
        return False
    except RuntimeError as e:  # the backend is already in use in this process: too late to join, one process
        if coordinator or "must be called before" not in str(e):
            raise
        return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: Sequence[str], *, num_processes: int, devices_per_process: int | None = None,
           port: int | None = None, timeout_s: float | None = None) -> int:
    """Runs ``lepton-jax <argv>`` in ``num_processes`` local processes joined over 127.0.0.1.

    With ``devices_per_process`` each process gets that many simulated CPU devices. If one process fails, the
    others are terminated; returns the first non-zero exit code (or 0).
    """
    port = port or free_port()
    procs = []
    for index in range(num_processes):
        env = dict(os.environ, **{COORDINATOR: f"127.0.0.1:{port}", NUM_PROCESSES: str(num_processes),
                                  PROCESS_ID: str(index)})
        if devices_per_process:
            flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
            env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
            env["JAX_PLATFORMS"] = "cpu"
        procs.append(subprocess.Popen([sys.executable, "-m", "lepton_jax.cli", *argv], env=env))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    code = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or (deadline is not None and time.monotonic() > deadline):
                code = failed[0] if failed else 124
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    return code or next((p.returncode for p in procs if p.returncode), 0)
