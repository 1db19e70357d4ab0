"""Chunk jobs of an ingest as Ray tasks: one task per chunk, a bounded number in flight, results in chunk order.

Each task runs :func:`lepton_jax.lake.chunks.process_chunk` on a Ray worker (any node of the cluster): it loads its
chunk, validates it and writes its fragments straight into the lake (the job carries the lake's URI, never a local
path of the driver). The driver consumes the results in chunk order, so its cross-chunk decisions (exact dedup,
leaks, against the on-disk hash index) and the one commit are exactly those of a single-process ingest.

Ray is imported only here, only when this executor is asked for. Without an address (``--ray-address`` or
``RAY_ADDRESS``) a local Ray instance is started and shut down afterwards; with one, the driver joins that cluster
and leaves it running. A Ray instance the caller already initialised is used as it is.

A local instance listens on 127.0.0.1 only: Ray replaces a loopback ``_node_ip_address`` by the machine's outward
address, and its servers then listen on every interface, unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's
single-machine mode, its default on macOS and Windows) is set before Ray is imported — which :func:`import_ray`
does for a local instance when Ray is not imported yet (and the environment does not say otherwise).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

from lepton_jax.errors import LakeError
from lepton_jax.lake.chunks import ChunkJob, process_chunk

EXTRA = "lepton_jax[ray]"
SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": node address 127.0.0.1, servers bound to it


def import_ray(address: str | None = None) -> Any:
    """The ``ray`` module, or a one-line :class:`LakeError` naming the extra to install. Without a cluster to join
    (``address``, ``RAY_ADDRESS``) a local instance will be started: Ray is then imported in single-machine mode."""
    if "ray" not in sys.modules and not (address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault(SINGLE_MACHINE, "0")
    try:
        import ray
    except ImportError as e:
        raise LakeError(f"--executor ray needs Ray, which is not installed ({e}); install it with "
                        f"pip install '{EXTRA}'") from None
    return ray


def run_on_ray(jobs: list[ChunkJob], uri: str, *, address: str | None = None, in_flight: int | None = None,
               report: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Yields :func:`process_chunk` of every job, in order, computed as Ray tasks (``in_flight`` at most at once;
    default: twice the cluster's CPUs). A failed task raises a one-line :class:`LakeError` naming its chunk and
    ``uri``; tasks still running are cancelled and waited for before the error leaves this generator, so the caller
    can discard the commit's data knowing no task still writes into it. Close the generator (``contextlib.closing``)
    to get the same clean-up when the consumer stops early. ``report`` (if given) receives where the tasks ran:
    the cluster's address, the tasks in flight, and per task its node and worker process."""
    ray = import_ray(address)
    connected = _connect(ray, address)
    pending: collections.deque[tuple[int, Any]] = collections.deque()
    report = {} if report is None else report
    try:
        limit = in_flight or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
        report.update(executor="ray", address=ray.get_runtime_context().gcs_address, in_flight=limit, tasks=[])
        # no retries: a retried task would find its own half-written fragment (arrays are written once); a lost
        # worker fails the ingest with one line instead, and nothing is published
        task = ray.remote(num_cpus=1, max_retries=0)(_chunk_task)
        submitted = 0
        while submitted < len(jobs) or pending:
            while submitted < len(jobs) and len(pending) < limit:
                pending.append((submitted, task.remote(jobs[submitted])))
                submitted += 1
            k, ref = pending[0]
            try:
                where, result = ray.get(ref)
            except ray.exceptions.RayError as e:
                raise LakeError(_describe(ray, e, jobs[k], uri)) from None
            pending.popleft()
            report["tasks"].append(where)
            yield result
    finally:
        try:
            _cancel(ray, [ref for _, ref in pending])
        finally:
            if connected:  # disconnects this driver; stops the instance only if it was started here
                ray.shutdown()


def _chunk_task(job: ChunkJob) -> tuple[dict[str, Any], dict[str, Any]]:
    """A chunk job on a Ray worker: where it ran, and its result."""
    import ray

    return {"chunk": job.chunk, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}, \
        process_chunk(job)


def _connect(ray: Any, address: str | None) -> bool:
    """Joins the cluster at ``address`` (else ``RAY_ADDRESS``), or starts a local one; True if this call initialised
    Ray in this process (then the caller shuts it down), False if the caller had."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Ray's own notices stay in its session logs (/tmp/ray/session_latest/logs): a failure is one line on stderr
    quiet: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address is None:
            ray.init(address="local", include_dashboard=False, **quiet)
        else:
            _check_reachable(address)
            ray.init(address=address, **quiet)
    except LakeError:
        raise
    except Exception as e:  # whatever ray.init raises (connection, version, authentication): one line
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LakeError(f"cannot connect to {where}: {first}") from None
    return True


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A one-line error for a ``HOST:PORT`` nobody listens on (``ray.init`` would retry it for minutes)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # 'auto' and other forms Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise LakeError(f"cannot reach the Ray cluster at {address} ({e.strerror or type(e).__name__}); start it "
                        "with `ray start --head` or pass its address (ray status prints it)") from None


def _describe(ray: Any, e: Exception, job: ChunkJob, uri: str) -> str:
    where = f"chunk {job.chunk} of {uri}"
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = getattr(e, "cause", None)
        if isinstance(cause, LakeError):
            return f"{where}: {cause}"
        text = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
        return f"{where}: the Ray task raised {type(cause).__name__ if cause is not None else 'an error'}" + \
            (f": {text}" if text else "") + "; nothing was committed"
    kind = type(e).__name__
    return (f"{where}: the Ray task was lost ({kind}: the worker or its node died, was killed or ran out of "
            "memory); nothing was committed")


def _cancel(ray: Any, refs: list[Any]) -> None:
    """Cancels tasks still running and waits until none of them can write any more."""
    if not refs:
        return
    for ref in refs:
        with contextlib.suppress(Exception):  # a task that already finished cannot be cancelled: nothing to do
            ray.cancel(ref, force=True)
    ray.wait(refs, num_returns=len(refs), timeout=120)
