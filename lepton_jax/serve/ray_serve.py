"""Scale-out on Ray Serve: the same KServe v2 routes, with Ray's batching (``@serve.batch``) and replicas.

Each Ray Serve replica is a process (on any node of the Ray cluster) that loads the registry models, compiles
every batch bucket, and answers HTTP through the same Starlette application as ``lepton-jax serve`` (same
routes, validation, binary tensors and error bodies) -- only the step from validated rows to probabilities goes
through Ray's ``@serve.batch`` instead of this package's :class:`~lepton_jax.serve.batcher.DynamicBatcher`.
Ray's proxy spreads requests over the replicas; ``num_replicas`` (or Ray's autoscaling config) sets how many.

    lepton-jax serve --backend ray --lake LAKE --model digits@production --replicas 4          # local Ray
    lepton-jax serve --backend ray --ray-address auto ...                                       # a Ray cluster

``/metrics`` on a Ray deployment shows the counters of whichever replica answered; use Ray's own metrics for the
deployment as a whole. With ``ServeConfig.follow`` (``--follow``) every replica follows its models' stages itself:
the same :mod:`lepton_jax.serve.lifecycle` code, started by the ASGI lifespan that Ray Serve runs in each replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from ray import serve

from lepton_jax.serve.batcher import BatchInfo
from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel, _Deployment

log = logging.getLogger("lepton_jax.serve.ray")


class _RayModelServer(ModelServer):
    """A :class:`ModelServer` whose ``predict`` hands rows to the Ray replica's batched method."""

    def __init__(self, models: Sequence[ServedModel], config: ServeConfig, replica: KServeReplica):
        super().__init__(models, config)
        self._replica = replica

    async def predict(self, dep: _Deployment, rows: np.ndarray) -> np.ndarray:
        return await self._replica.batched((dep, rows))  # the deployment (version) that took the request answers


@serve.deployment
@serve.ingress()
class KServeReplica:
    """One Ray Serve replica: registry models, compiled, behind the KServe v2 application."""

    def __init__(self, lake_root: str, refs: Sequence[str], config: ServeConfig):
        models = [ServedModel.from_registry(lake_root, ref) for ref in refs]
        self.config = dataclasses.replace(config, replicas=1, warm_up_on_startup=False)
        self.server = _RayModelServer(models, self.config, self)
        self.server.freeze_gc_after_warm_up = True  # this replica process is ours
        self.server.warm_up()  # compile every bucket before Ray routes traffic here
        self.batched.set_max_batch_size(self.config.max_batch_size)
        self.batched.set_batch_wait_timeout_s(self.config.max_delay_ms / 1000)

    def __serve_build_asgi_app__(self) -> Any:
        return self.server.app

    async def check_health(self) -> None:
        if not self.server.ready:
            raise RuntimeError("not ready")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def batched(self, items: list[tuple[_Deployment, np.ndarray]]) -> list[np.ndarray]:
        """Ray's batching: requests (the deployment that took them, rows) gathered by Ray, run per deployment -- a
        model version: a replica following a stage may hold two for a moment -- in bucketed chunks."""
        results: list[np.ndarray | None] = [None] * len(items)
        for dep in {id(d): d for d, _ in items}.values():
            picked = [i for i, (d, _) in enumerate(items) if d is dep]
            name = dep.model.name
            rows = np.concatenate([items[i][1] for i in picked])
            start = time.monotonic()
            outputs = await asyncio.to_thread(_run_bucketed, dep, rows)
            dep.on_batch(BatchInfo(dep.batcher.replicas[0].name, rows.shape[0], rows.shape[0], [0.0] * len(picked),
                                   rows, outputs))
            offset = 0
            for i in picked:
                k = items[i][1].shape[0]
                results[i] = outputs[offset:offset + k]
                offset += k
            log.debug("batch of %d rows for %s in %.1f ms", rows.shape[0], name, (time.monotonic() - start) * 1e3)
        return results  # type: ignore[return-value]


def _run_bucketed(dep: _Deployment, rows: np.ndarray) -> np.ndarray:
    """``rows`` through the replica's jitted function in chunks padded to the compiled bucket sizes."""
    batcher = dep.batcher
    replica, size = batcher.replicas[0], batcher.max_batch_size
    outs = []
    for i in range(0, rows.shape[0], size):
        chunk = rows[i:i + size]
        outs.append(replica.run_padded(chunk, next(b for b in batcher.buckets if b >= chunk.shape[0])))
    return np.concatenate(outs)


def application(lake_root: str | Path, refs: Sequence[str], config: ServeConfig, *,
                num_cpus: float = 1.0) -> Any:
    """The Ray Serve application (``serve.run`` it): ``config.replicas`` replicas of :class:`KServeReplica`."""
    return KServeReplica.options(num_replicas=config.replicas, ray_actor_options={"num_cpus": num_cpus},
                                 max_ongoing_requests=max(64, 4 * config.max_batch_size)).bind(
        str(lake_root), list(refs), config)


def run_ray(lake_root: str | Path, refs: Sequence[str], config: ServeConfig, *, host: str = "127.0.0.1",
            port: int = 8000, address: str | None = None, num_cpus: float = 1.0) -> None:
    """Starts (or joins, with ``address``) a Ray cluster, serves the models on it until SIGINT or SIGTERM, then shuts
    down in order: the application removed, and a Ray this call started stopped with all its processes.

    A signal during start-up (Ray starting, replicas loading and compiling) stops it there, in the same order; a
    further one while shutting down is ignored (stopping half-way would orphan Ray's processes). A local Ray for a
    loopback ``host`` runs on 127.0.0.1 without its dashboard, so nothing it starts listens beyond this machine
    (with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the environment before ray is imported, as the CLI sets it).
    """
    import ray
    from ray._private import ray_constants

    stop = _Stop()
    local = address is None
    options: dict[str, Any] = {"include_dashboard": False}
    if local and host in ("127.0.0.1", "localhost", "::1"):
        # Ray's GCS, raylet, workers and agents bind loopback only when the node address is 127.0.0.1, and ray.init
        # turns a 127.0.0.1 `_node_ip_address` into the machine's address unless Ray runs as one machine
        # (ray/_private/services.py: resolve_ip_for_localhost -> get_node_ip_address), which it reads once on import
        if ray_constants.ENABLE_RAY_CLUSTER:
            log.warning("Ray's processes will listen on this machine's address, not only on %s: set "
                        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before ray is imported (the CLI does)", host)
        options["_node_ip_address"] = "127.0.0.1"
    previous = {sig: signal.signal(sig, stop.handle) for sig in _SIGNALS}
    try:
        try:
            ray.init(address=address, **options)
        except SystemExit as e:  # ray.init's own SIGTERM handler (installed while it starts) exits
            if e.code != signal.SIGTERM:
                raise
            raise _Stopped from e
        for sig in _SIGNALS:  # ray.init replaced ours for SIGTERM
            signal.signal(sig, stop.handle)
        stop.check()
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(lake_root, refs, config, num_cpus=num_cpus), name="lepton_jax", route_prefix="/")
        stop.serving = True
        stop.check()
        log.info("serving on http://%s:%d until SIGINT or SIGTERM", host, port)
        while not stop.requested.wait(1.0):
            pass
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        for sig in _SIGNALS:  # nothing interrupts the shutdown itself
            signal.signal(sig, signal.SIG_IGN)
        try:
            if ray.is_initialized():
                if local:  # our own local Ray: stop it all
                    log.info("stopping Ray Serve and the local Ray")
                    serve.shutdown()
                    ray.shutdown()
                else:  # a shared cluster: remove only this application
                    log.info("removing the application lepton_jax from the Ray cluster")
                    serve.delete("lepton_jax")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Stopped(Exception):
    """A signal stopped the start-up."""


class _Stop:
    """SIGINT/SIGTERM handling for :func:`run_ray`: before serving, the signal interrupts the start-up; once serving,
    it ends the wait. The flag also holds where an interruption is swallowed (e.g. inside a gc callback)."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.serving = False

    def handle(self, sig: int, frame: FrameType | None) -> None:
        if not self.requested.is_set():
            log.info("%s: shutting down", signal.Signals(sig).name)
        self.requested.set()
        if not self.serving:
            raise _Stopped

    def check(self) -> None:
        if self.requested.is_set():
            raise _Stopped
