"""A model server speaking the KServe v2 (Open Inference) protocol over HTTP: an ASGI app (Starlette) for uvicorn.

Endpoints (JSON bodies; inference also takes and returns the binary tensor extension, as ``tritonclient`` sends
by default)::

    GET  /v2/health/live                 200 while the process runs
    GET  /v2/health/ready                200 once every model is warmed up, 503 while warming up or draining
    GET  /v2                             server metadata (extensions: binary_tensor_data, model_configuration)
    GET  /v2/models/{name}[/versions/{v}]         model metadata: inputs, outputs, datatypes, shapes, label names
    GET  /v2/models/{name}[/versions/{v}]/config  Triton-style model configuration (batching, instances)
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer
    GET  /metrics                        Prometheus text format

Requests go through a :class:`~lepton_jax.serve.batcher.DynamicBatcher` per model, whose replicas sit on separate
devices. Large bodies are decoded and answers encoded on a thread pool, so the event loop keeps answering small
requests. Every refusal -- bad input, unknown route, wrong method, a full queue -- is a 4xx with a KServe error body
``{"error": "..."}`` and increments ``lepton_errors_total{kind=...}``. On SIGTERM the server first reports
"draining" on readiness while still serving (``drain_grace_s``), then stops accepting, finishes what it holds and
exits. With a token configured, every endpoint except the health probes needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import hmac
import logging
import math
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import FrameType
from typing import Any

import jax
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lepton_jax.data.transforms import input_array, input_bounds, input_spec, scale
from lepton_jax.serve.batcher import BatchInfo, DrainingError, DynamicBatcher, QueueFullError, Replica
from lepton_jax.serve.drift import DriftMonitor
from lepton_jax.serve.http_limits import read_body, uvicorn_config
from lepton_jax.serve.kserve import (
    HEADER_LENGTH,
    JSON_HEADERS,
    InferRequest,
    InputSpec,
    RequestError,
    Tensor,
    decode_rows,
    encode_response,
    error_body,
    inflate_within,
)
from lepton_jax.serve.metrics import ServerMetrics

log = logging.getLogger("lepton_jax.serve")

__all__ = ["ModelServer", "RequestError", "ServeConfig", "ServedModel", "run_server"]

_HEADER_LENGTH = HEADER_LENGTH.encode()
_REQUEST_HEADERS = (b"authorization", b"content-length", b"content-encoding", _HEADER_LENGTH)  # what _infer reads
_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
JSON_BYTES_PER_VALUE = 25  # the longest JSON float ("-1.2345678901234567e-05") and its separator ", "


@dataclasses.dataclass
class ServeConfig:
    """Batching, back-pressure, limits, lifecycle and monitoring of a :class:`ModelServer`.

    ``max_body_bytes=None`` derives the body limit from the largest legal request: ``max_request_rows`` rows
    written as JSON at :data:`JSON_BYTES_PER_VALUE` bytes per value, plus 64 KiB. A request with more rows than
    ``min(max_request_rows, max_queue_rows)`` can never be queued and gets 413.

    Bodies over ``inline_parse_bytes`` are decoded (and their answers encoded) in ``codec_processes`` worker
    processes, so neither the event loop nor the GIL is held while megabytes of JSON are parsed; 0 uses threads.
    The workers run ``codec_niceness`` steps below the server's CPU priority (``os.nice``), so where they share a core
    with the event loop, decoding one huge body yields the core to the small requests behind it (head-of-line).

    Slow clients (:mod:`~lepton_jax.serve.http_limits`): a body must arrive within ``body_timeout_s`` (408), a
    connection with no request in progress closes after ``idle_timeout_s``, connections beyond ``max_connections``
    get 503. Shutdown takes at most ``drain_grace_s`` + ``drain_timeout_s`` (20 s by default: inside Kubernetes' 30 s);
    what is still running then answers 503.
    """

    max_batch_size: int = 32
    max_delay_ms: float = 2.0
    max_queue_rows: int = 1024
    request_timeout_s: float = 10.0
    max_body_bytes: int | None = None
    max_request_rows: int = 1024
    replicas: int = 1
    token: str | None = None
    drain_grace_s: float = 5.0
    drain_timeout_s: float = 15.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 5.0
    max_connections: int = 1000
    drift_window: int = 1000
    drift_window_s: float | None = None
    drift_min_samples: int = 200
    drift_threshold: float = 0.25
    drift_interval_s: float = 1.0
    inline_parse_bytes: int = 64 << 10
    codec_processes: int = 1
    codec_niceness: int = 10
    warm_up_on_startup: bool = True


class ServedModel:
    """A model's parameters, input schema and drift reference, with one replica per device."""

    def __init__(self, name: str, version: str, graphdef: Any, params: Any, schema: dict[str, Any], *,
                 reference: dict[str, Any] | None = None, info: dict[str, Any] | None = None):
        self.name, self.version, self.schema = name, str(version), schema
        self.graphdef, self.params = graphdef, jax.device_get(params)
        self.reference, self.info = reference, dict(info or {})
        spec = self.input_spec = input_spec(schema)
        self.example_shape = tuple(spec["example_shape"])
        self.value_range = tuple(float(v) for v in spec["value_range"])
        self.label_names = list(schema["label_names"])
        self.input_name = input_array(schema)  # the request field: the lake array's name

    @classmethod
    def from_registry(cls, lake_root: str | Path, ref: str) -> ServedModel:
        """``name@version`` / ``name@production`` from the registry in ``lake_root``."""
        from lepton_jax.serve.registry import Registry

        entry = Registry(lake_root).resolve(ref)
        stage = ref.partition("@")[2]
        from lepton_jax.serve.predictor import Predictor

        predictor = Predictor.from_registry(entry, devices=jax.devices()[:1])
        model = cls(entry.name, str(entry.version), predictor.graphdef, predictor.params, predictor.schema,
                    reference=entry.reference, info={"step": entry.step, "source_workdir": str(entry.workdir)})
        model.info.update({"registry": entry.ref, "requested": ref, "stage": stage if not stage.isdigit() else None,
                           "metrics": entry.record.get("metrics", {}),
                           "data": {k: entry.record["data"][k] for k in ("table", "version")}})
        return model

    @classmethod
    def from_workdir(cls, workdir: str | Path, *, name: str, version: str = "1", step: int | None = None,
                     reference: dict[str, Any] | None = None) -> ServedModel:
        from lepton_jax.serve.predictor import Predictor

        predictor = Predictor.from_workdir(workdir, step=step, devices=jax.devices()[:1])
        return cls(name, version, predictor.graphdef, predictor.params, predictor.schema, reference=reference,
                   info={"workdir": str(Path(workdir).resolve()), "step": predictor.step})

    def make_replicas(self, count: int, devices: Sequence[Any] | None = None) -> list[Replica]:
        """``count`` replicas on ``devices`` (default: all), round robin when there are fewer devices."""
        from lepton_jax.train.step import make_predict

        devices = list(devices or jax.devices())
        if count > len(devices):
            log.warning("%d replicas of %s on %d device(s): replicas share devices round robin%s", count, self.name,
                        len(devices), " (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N before "
                        "start-up gives N devices)" if devices[0].platform == "cpu" else "")
        apply = make_predict(self.graphdef)
        lo, hi = input_bounds(self.input_spec)  # per column for tabular tables (data.transforms, as in training)

        @jax.jit
        def probabilities(params, raw):
            return jax.nn.softmax(apply(params, scale(raw, lo, hi)).astype(np.float32), axis=-1)

        replicas = []
        for i in range(count):
            device = devices[i % len(devices)]
            params = jax.device_put(self.params, device)

            def run(rows: np.ndarray, params=params, device=device) -> np.ndarray:
                return np.asarray(probabilities(params, jax.device_put(rows, device)))

            replicas.append(Replica(f"{i}:{device.platform}{device.id}", run))
        return replicas

    @property
    def cells(self) -> int:
        return math.prod(self.example_shape)

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata."""
        return {"name": self.name, "versions": [self.version], "platform": f"jax_{jax.default_backend()}",
                "inputs": [{"name": self.input_name, "datatype": "FP32", "shape": [-1, *self.example_shape]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.label_names)]},
                            {"name": "class", "datatype": "INT64", "shape": [-1]},
                            {"name": "label", "datatype": "BYTES", "shape": [-1]}],
                "parameters": {"label_names": self.label_names, "value_range": list(self.value_range),
                               **({"column_ranges": self.input_spec["column_ranges"]}
                                  if "column_ranges" in self.input_spec else {}),
                               "units": "raw values of the training lake table", **self.info}}

    def config(self, serve: ServeConfig) -> dict[str, Any]:
        """Triton-style model configuration (``GET /v2/models/{name}/config``); dims exclude the batch axis."""
        return {"name": self.name, "platform": f"jax_{jax.default_backend()}", "backend": "lepton_jax",
                "version_policy": {"specific": {"versions": [self.version]}},
                "max_batch_size": min(serve.max_request_rows, serve.max_queue_rows),
                "input": [{"name": self.input_name, "data_type": "TYPE_FP32", "format": "FORMAT_NONE",
                           "dims": list(self.example_shape)}],
                "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [len(self.label_names)],
                            "label_filename": ""},
                           {"name": "class", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}},
                           {"name": "label", "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}}],
                "dynamic_batching": {"preferred_batch_size": [b for b in _buckets(serve.max_batch_size)],
                                     "max_queue_delay_microseconds": int(serve.max_delay_ms * 1000),
                                     "default_queue_policy": {"max_queue_size": serve.max_queue_rows,
                                                              "default_timeout_microseconds":
                                                                  int(serve.request_timeout_s * 1e6)}},
                "instance_group": [{"name": f"{self.name}_0", "kind": f"KIND_{jax.default_backend().upper()}",
                                    "count": serve.replicas}],
                "parameters": {"value_range": {"string_value": f"{self.value_range[0]},{self.value_range[1]}"},
                               "label_names": {"string_value": ",".join(self.label_names)}}}

    def body_limit(self, serve: ServeConfig) -> int:
        """The request body limit: configured, or derived from the largest legal request as JSON."""
        if serve.max_body_bytes is not None:
            return int(serve.max_body_bytes)
        return min(serve.max_request_rows, serve.max_queue_rows) * self.cells * JSON_BYTES_PER_VALUE + (64 << 10)

    @functools.cached_property
    def _label_bytes(self) -> np.ndarray:
        labels = np.empty(len(self.label_names), object)
        labels[:] = [name.encode() for name in self.label_names]
        return labels

    @functools.cached_property
    def spec(self) -> InputSpec:
        columns = self.input_spec.get("column_ranges")
        return InputSpec(self.name, self.input_name, self.example_shape, self.value_range,
                         None if columns is None else tuple(tuple(float(v) for v in c) for c in columns),
                         tuple(self.input_spec["columns"]) if "columns" in self.input_spec else None)

    def rows(self, request: InferRequest, max_rows: int) -> np.ndarray:
        """The decoded request's input -> validated float32 rows ``(N, *example_shape)``."""
        return self.spec.rows(request, max_rows)

    def outputs(self, probabilities: np.ndarray) -> list[Tensor]:
        """The model's outputs for ``probabilities`` (N, C): probabilities, class index and label name."""
        classes = probabilities.argmax(-1).astype(np.int64, copy=False)
        labels = self._label_bytes[classes]
        n = probabilities.shape[0]
        return [Tensor("probabilities", "FP32", list(probabilities.shape), probabilities.astype(np.float32)),
                Tensor("class", "INT64", [n], classes), Tensor("label", "BYTES", [n], labels)]


def _buckets(max_batch_size: int) -> list[int]:
    from lepton_jax.serve.batcher import bucket_sizes

    return bucket_sizes(max_batch_size)


class _Deployment:
    """A served model with its batcher, drift monitor and limits."""

    def __init__(self, model: ServedModel, config: ServeConfig, metrics: ServerMetrics,
                 devices: Sequence[Any] | None):
        self.model = model
        self.max_rows = min(config.max_request_rows, config.max_queue_rows)
        self.body_limit = model.body_limit(config)
        name = model.name
        self.drift = None
        if model.reference:
            self.drift = DriftMonitor(model.reference, model=name, window=config.drift_window,
                                      window_s=config.drift_window_s, min_samples=config.drift_min_samples,
                                      threshold=config.drift_threshold, report=self._report_drift(metrics, name))
            metrics.drift_age.labels(name).set_function(lambda: self.drift.age_s)
            metrics.drift_examples.labels(name).set_function(lambda: self.drift.num_examples)
        self.on_batch = self._on_batch(metrics, name)
        self.batcher = DynamicBatcher(model.make_replicas(config.replicas, devices),
                                      max_batch_size=config.max_batch_size, max_delay_s=config.max_delay_ms / 1000,
                                      max_queue_rows=config.max_queue_rows, on_batch=self.on_batch)
        metrics.queue_depth.labels(name).set_function(lambda: self.batcher.queued_rows)  # read when scraped
        for replica in self.batcher.replicas:
            metrics.replica_inflight.labels(name, replica.name).set_function(lambda r=replica: r.inflight_rows)

    def _on_batch(self, metrics: ServerMetrics, name: str):
        batch_size, queue_time = metrics.batch_size.labels(name), metrics.queue_time.labels(name)

        def on_batch(info: BatchInfo) -> None:
            batch_size.observe(info.size)
            for wait in info.queue_times:
                queue_time.observe(wait)
            metrics.replica_batches.labels(name, info.replica).inc()
            metrics.replica_rows.labels(name, info.replica).inc(info.size)
            if self.drift:
                self.drift.observe(info.inputs, info.outputs.argmax(-1))  # queued; binned by the drift task
        return on_batch

    @staticmethod
    def _report_drift(metrics: ServerMetrics, name: str):
        def report(kind: str, group: str, value: float) -> None:
            if kind == "input":
                metrics.input_drift.labels(name, group).set(value)
            else:
                metrics.prediction_drift.labels(name).set(value)
        return report

    async def drift_loop(self, interval_s: float) -> None:
        """Folds served batches into the drift window every ``interval_s``, on a worker thread."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.drift.update)
            except Exception:  # monitoring must never take serving down
                log.exception("drift update failed for model %s", self.model.name)


class ModelServer:
    """Serves one or more :class:`ServedModel` s; ``app`` is the ASGI application."""

    def __init__(self, models: Sequence[ServedModel], config: ServeConfig | None = None,
                 devices: Sequence[Any] | None = None):
        self.config = config or ServeConfig()
        self.metrics = ServerMetrics()
        self.deployments = {m.name: _Deployment(m, self.config, self.metrics, devices) for m in models}
        self._ready = threading.Event()
        self._draining = self._abandoned = False
        self._shutting_down = threading.Event()  # the lifespan shutdown has begun
        self._pool: Executor = self._codec_pool()
        self.accepted = self.answered = 0
        self.freeze_gc_after_warm_up = False  # a process-wide setting: only where the server owns the process
        versioned = "/v2/models/{name}/versions/{version}"
        routes = [Route("/v2/health/live", self.live, methods=["GET"]),
                  Route("/v2/health/ready", self.ready_endpoint, methods=["GET"]),
                  Route("/v2", self.server_metadata, methods=["GET"]),
                  Route("/metrics", self.metrics_endpoint, methods=["GET"])]
        for prefix in ("/v2/models/{name}", versioned):
            routes += [Route(prefix, self.model_metadata, methods=["GET"]),
                       Route(prefix + "/config", self.model_config, methods=["GET"]),
                       Route(prefix + "/ready", self.model_ready, methods=["GET"]),
                       Route(prefix + "/infer", self.infer, methods=["POST"])]
        self._starlette = Starlette(routes=routes, lifespan=self._lifespan,
                                    exception_handlers={HTTPException: self._http_error, Exception: self._crash})

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._draining

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """Readiness turns 503 "draining" and responses carry ``Connection: close``; requests are still served."""
        if not self._draining:
            self._draining = True
            self.metrics.ready.set(0)
            log.info("draining: readiness answers 503; still serving requests")

    def abandon(self) -> int:
        """A force quit: every queued or running inference request answers 503 now instead of being waited for (those
        still reading their body or decoding answer 503 when cancelled); returns how many were unfinished."""
        self._draining = self._abandoned = True
        self.metrics.ready.set(0)
        for dep in self.deployments.values():
            dep.batcher.abandon("the server was force-quit before this request finished; retry on another replica")
        return self.accepted - self.answered

    @property
    def app(self) -> ModelServer:
        """The ASGI application (the server itself: ``await server(scope, receive, send)``)."""
        return self

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """ASGI 3 entry: counts requests in and answers out; while draining, asks clients to close."""
        if scope["type"] != "http":
            await self._starlette(scope, receive, send)
            return
        self.accepted += 1
        if scope["method"] == "POST" and (match := _INFER_PATH.fullmatch(scope["path"])):  # the hot path, direct
            status, headers, content = await self._infer(match[1], match[2], scope, receive)
            raw = [(b"content-type", b"application/json")] if headers is JSON_HEADERS else \
                [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
            raw.append((b"content-length", b"%d" % len(content)))
            if self._draining:
                raw.append((b"connection", b"close"))
            await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": content})
            self.answered += 1
            return

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and self._draining:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self.answered += 1
            await send(message)

        await self._starlette(scope, receive, send_wrapper)

    def warm_up(self) -> None:
        """Compiles every batch bucket on every replica, then marks the server ready (blocking; thread-safe). A
        shutdown meanwhile stops it after the compile in progress (XLA's cannot be interrupted)."""
        start = time.perf_counter()
        for dep in self.deployments.values():
            lo = dep.model.value_range[0]
            if not dep.batcher.warm_up(np.full(dep.model.example_shape, lo, np.float32), self._shutting_down):
                log.info("warm-up stopped by the shutdown after %.1f s", time.perf_counter() - start)
                return
        if self.freeze_gc_after_warm_up:  # the process is ours (run_server, a Ray replica): no 100 ms gc pauses
            gc.collect()
            gc.freeze()  # the imported libraries and compiled model stay out of later collections
        self._ready.set()
        if not self._draining:
            self.metrics.ready.set(1)
        log.info("warm-up done in %.1f s: %s", time.perf_counter() - start,
                 {n: d.batcher.buckets for n, d in self.deployments.items()})

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette):
        for dep in self.deployments.values():
            dep.batcher.start()
        try:  # start every codec worker before traffic (each spawns on demand; one task each while none is idle)
            loop = asyncio.get_running_loop()
            with _signals_blocked():  # each submit starts a worker here, with this thread's signal mask
                starting = [loop.run_in_executor(self._pool, math.prod, (1,))
                            for _ in range(max(1, self.config.codec_processes))]
            await asyncio.gather(*starting)
        except BrokenProcessPool:  # e.g. a script without `if __name__ == "__main__":` (spawn re-imports it)
            log.warning("codec worker processes did not start; decoding large bodies on threads instead")
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kserve-codec")
        drift_tasks = [asyncio.create_task(d.drift_loop(self.config.drift_interval_s), name=f"drift-{n}")
                       for n, d in self.deployments.items() if d.drift]
        warming = threading.Thread(target=self.warm_up, name="warm-up", daemon=True)
        if self.config.warm_up_on_startup:
            warming.start()
        yield
        self._shutting_down.set()
        self.begin_drain()
        await asyncio.gather(*(d.batcher.drain(self.config.drain_timeout_s) for d in self.deployments.values()))
        for task in drift_tasks:
            task.cancel()
        await asyncio.gather(*drift_tasks, return_exceptions=True)
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        if warming.is_alive():  # a process that exits while XLA compiles on a daemon thread aborts (rc 134)
            await asyncio.to_thread(warming.join)
        log.info("drained: answered %d of %d accepted requests; %s", self.answered, self.accepted,
                 {n: d.batcher.stats() for n, d in self.deployments.items()})

    # -- endpoints -------------------------------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready_endpoint(self, request: Request) -> Response:
        if self.ready:
            return JSONResponse({"ready": True})
        reason = "draining" if self._draining else "warming up (compiling batch buckets)"
        return JSONResponse({"ready": False, "error": reason}, status_code=503)

    async def server_metadata(self, request: Request) -> Response:
        from lepton_jax import __version__

        try:
            self._check_auth(request)
        except RequestError as e:
            return self._error(e)
        return JSONResponse({"name": "lepton_jax", "version": __version__,
                             "extensions": ["binary_tensor_data", "model_configuration"],
                             "models": sorted(self.deployments)})

    async def model_metadata(self, request: Request) -> Response:
        try:
            return JSONResponse(self._resolve(request).model.metadata())
        except RequestError as e:
            return self._error(e)

    async def model_config(self, request: Request) -> Response:
        try:
            return JSONResponse(self._resolve(request).model.config(self.config))
        except RequestError as e:
            return self._error(e)

    async def model_ready(self, request: Request) -> Response:
        try:
            dep = self._resolve(request)
        except RequestError as e:
            return self._error(e)
        return JSONResponse({"name": dep.model.name, "ready": self.ready}, status_code=200 if self.ready else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        try:
            self._check_auth(request)
        except RequestError as e:
            return self._error(e)
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def infer(self, request: Request) -> Response:
        """The inference route as a Starlette endpoint (``__call__`` answers POSTs to it without Starlette)."""
        status, headers, content = await self._infer(request.path_params["name"], request.path_params.get("version"),
                                                     request.scope, request.receive)
        return Response(content, status_code=status, headers=headers)

    async def _infer(self, name: str, version: str | None, scope: dict[str, Any],
                     receive: Any) -> tuple[int, Mapping[str, str], bytes]:
        """One inference request on raw ASGI: (status, headers, body); never raises."""
        start = time.perf_counter()
        label = name if name in self.deployments else "unknown"
        headers = dict.fromkeys(_REQUEST_HEADERS)  # ASGI: lower-case names, bytes
        for key, value in scope["headers"]:
            if key in headers:
                headers[key] = value.decode("latin-1")
        try:
            self._authorize_header(headers[b"authorization"] or "")
            dep = self._named(name, version)
            if not self._ready.is_set():
                raise RequestError(503, "unavailable", "the server is warming up; poll /v2/health/ready")
            if dep.batcher.draining:
                raise RequestError(503, "unavailable", "the server is shutting down")
            body = await read_body(receive, dep.body_limit, headers[b"content-length"], self.config.body_timeout_s)
            inline = inflate_within(body, headers[b"content-encoding"], self.config.inline_parse_bytes)
            if inline is None:  # large once inflated: decoded off the event loop (and its GIL)
                decoded, rows = await self._offload(functools.partial(
                    decode_rows, spec=dep.model.spec, body_limit=dep.body_limit, max_rows=dep.max_rows), body,
                    headers[_HEADER_LENGTH], headers[b"content-encoding"])
            else:
                decoded, rows = decode_rows(inline, headers[_HEADER_LENGTH], None, spec=dep.model.spec,
                                            body_limit=dep.body_limit, max_rows=dep.max_rows)
            try:
                probabilities = await self.predict(dep, rows)
            except QueueFullError as e:
                raise RequestError(429, "queue_full", str(e), headers={"Retry-After": "1"}) from e
            except TimeoutError as e:
                raise RequestError(504, "timeout", f"no result within {self.config.request_timeout_s} s") from e
            except DrainingError as e:
                raise RequestError(503, "unavailable", str(e)) from e
            if rows.shape[0] > 256:
                content, out_headers = await self._offload(functools.partial(
                    _encode_in_worker, model_name=dep.model.name, model_version=dep.model.version),
                    decoded, dep.model.outputs(probabilities))
            else:
                content, out_headers = encode_response(decoded, dep.model.outputs(probabilities),
                                                       model_name=dep.model.name, model_version=dep.model.version)
            status = 200
        except RequestError as e:
            status, out_headers, content = self._error_parts(e)
        except asyncio.CancelledError:  # a force quit stopped the codec workers, or the event loop is ending
            if not self._abandoned:
                raise
            status, out_headers, content = self._error_parts(
                RequestError(503, "unavailable", "the server was force-quit before this request finished"))
        except Exception as e:  # a bug or a failed batch: report it, keep serving
            log.exception("inference failed")
            status, out_headers, content = self._error_parts(
                RequestError(500, "internal", f"internal error: {type(e).__name__}: {e}"))
        self._counted(label, status).inc()
        if status == 200:
            self._latency(label).observe(time.perf_counter() - start)
        return status, out_headers, content

    @functools.lru_cache(maxsize=1024)  # noqa: B019  (one server object per process; bounded)
    def _counted(self, model: str, code: int) -> Any:
        return self.metrics.requests.labels(model, str(code))

    @functools.lru_cache(maxsize=64)  # noqa: B019
    def _latency(self, model: str) -> Any:
        return self.metrics.latency.labels(model)

    # -- helpers ---------------------------------------------------------------------------------------------
    async def predict(self, dep: _Deployment, rows: np.ndarray) -> np.ndarray:
        """Probabilities for validated ``rows``: through the dynamic batcher here (Ray Serve overrides this)."""
        return await dep.batcher.infer(rows, timeout_s=self.config.request_timeout_s)

    def _codec_pool(self) -> Executor:
        """The codec worker processes (``codec_processes``; threads when 0)."""
        if self.config.codec_processes > 0:  # spawn: forking a process that runs jax threads is unsafe
            return ProcessPoolExecutor(self.config.codec_processes, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_codec_worker_init, initargs=(self.config.codec_niceness,))
        return ThreadPoolExecutor(max_workers=2, thread_name_prefix="kserve-codec")

    async def _offload(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the codec worker pool (large bodies; small ones are cheaper inline)."""
        pool = self._pool
        try:
            return await _submit(pool, fn, *args)
        except BrokenProcessPool:  # a worker died (killed, out of memory): a fresh pool, and this request once more
            if self._pool is pool:
                log.warning("a codec worker process died; starting new ones")
                self._pool = self._codec_pool()
                pool.shutdown(wait=False, cancel_futures=True)
            return await _submit(self._pool, fn, *args)

    def _resolve(self, request: Request) -> _Deployment:
        """Auth, then the deployment named (and versioned) in the path, or a 401/404."""
        self._check_auth(request)
        return self._named(request.path_params["name"], request.path_params.get("version"))

    def _named(self, name: str, version: str | None) -> _Deployment:
        if name not in self.deployments:
            raise RequestError(404, "unknown_model", f"unknown model {name!r}; this server serves: "
                                                     f"{', '.join(sorted(self.deployments))}")
        dep = self.deployments[name]
        if version is not None and version != dep.model.version:
            raise RequestError(404, "unknown_model", f"model {name!r} has no version {version!r} on this "
                                                     f"server; it serves version {dep.model.version}")
        return dep

    def _check_auth(self, request: Request) -> None:
        self._authorize_header(request.headers.get("authorization", ""))

    def _authorize_header(self, header: str) -> None:
        token = self.config.token
        if not token:
            return
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise RequestError(401, "unauthorized", "missing or wrong bearer token: send 'Authorization: Bearer "
                                                    "<token>'")

    def _error_parts(self, error: RequestError) -> tuple[int, dict[str, str], bytes]:
        self.metrics.errors.labels(error.kind).inc()
        headers = {"content-type": "application/json", **(error.headers or {})}
        if error.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return error.status, headers, error_body(error.message)

    def over_capacity(self) -> tuple[int, dict[str, str], bytes]:
        """The answer to a request on a connection beyond ``max_connections``."""
        return self._error_parts(RequestError(503, "overloaded", f"this server is at its limit of "
                                              f"{self.config.max_connections} connections; retry later",
                                              headers={"Retry-After": "1"}))

    def _error(self, error: RequestError) -> Response:
        status, headers, content = self._error_parts(error)
        return Response(content, status_code=status, headers=headers)

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's own 404 (no such route) and 405 (wrong method), as KServe error bodies."""
        if exc.status_code == 404:
            error = RequestError(404, "no_route", f"no endpoint {request.url.path}; see /v2 (KServe v2 protocol)")
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            error = RequestError(405, "method", f"{request.method} is not allowed on {request.url.path}; use "
                                                f"{allowed}", headers=exc.headers)
        else:
            error = RequestError(exc.status_code, "http", str(exc.detail), headers=exc.headers)
        return self._error(error)

    async def _crash(self, request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return self._error(RequestError(500, "internal", f"internal error: {type(exc).__name__}"))


def _encode_in_worker(request: InferRequest, outputs: list[Tensor], *, model_name: str,
                      model_version: str) -> tuple[bytes, dict[str, str]]:
    """:func:`encode_response` for a codec worker process: its headers as a plain (picklable) dict."""
    content, headers = encode_response(request, outputs, model_name=model_name, model_version=model_version)
    return content, dict(headers)


def graceful_uvicorn(config: Any, model_server: ModelServer, grace_s: float) -> Any:
    """A ``uvicorn.Server`` with a drain phase: the first SIGTERM/SIGINT starts it, the grace period ends it.

    During the grace period readiness answers 503 "draining" and every response asks its client to close the
    connection, so no keep-alive connection is idle when the listener closes; then uvicorn stops accepting,
    finishes in-flight requests and runs the lifespan shutdown (the batchers drain). A second signal skips the
    rest of the grace period; a SIGINT after that, or the end of ``drain_timeout_s``, stops waiting for in-flight
    requests (a force quit: they answer 503 with a KServe error body, and the lifespan shutdown still runs). The
    process exits 0 either way: unlike uvicorn's own handler, this one does not record the signals for
    ``capture_signals`` to raise again once the server has stopped (which would end in KeyboardInterrupt, 130, or
    death by SIGTERM, 143, after a clean drain).
    """
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            name = signal.Signals(sig).name
            if self.should_exit:
                if sig == signal.SIGINT and not self.force_exit:
                    log.warning("%s: not waiting for in-flight requests any more", name)
                    self.force_exit = True
            elif model_server.draining or grace_s <= 0:
                if model_server.draining:
                    log.info("%s: ending the grace period now", name)
                self.should_exit = True
            else:
                log.info("%s: serving on for %.1f s while readiness answers 503", name, grace_s)
                model_server.begin_drain()
                timer = threading.Timer(grace_s, lambda: setattr(self, "should_exit", True))
                timer.daemon = True
                timer.start()

        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            for server in self.servers:  # stop accepting ...
                server.close()
            for sock in sockets or []:
                sock.close()
            await asyncio.sleep(0.25)  # ... but read and answer what already arrived on accepted connections
            timer = asyncio.get_running_loop().call_later(model_server.config.drain_timeout_s, self._drain_timed_out)
            try:
                await super().shutdown(sockets)  # then close idle connections and wait for in-flight requests
            finally:
                timer.cancel()
            # a force quit before the lifespan shutdown began (uvicorn skips it then): answer what is left 503 and run
            # it; one that came during the lifespan shutdown has nothing left to do
            if self.force_exit and not model_server._shutting_down.is_set():
                unfinished = model_server.abandon()
                if stalled := list(self.server_state.tasks):  # e.g. still reading a body: answers 503 when cancelled
                    for task in stalled:
                        task.cancel()
                    await asyncio.wait(stalled, timeout=1.0)
                await asyncio.sleep(0.05)  # the 503s go out
                log.warning("force quit: %d unfinished request(s) answered 503 (if their clients still listened)",
                            unfinished)
                await self.lifespan.shutdown()  # the batchers stop, the codec workers exit

        def _drain_timed_out(self) -> None:
            log.warning("drain timeout (%g s): not waiting for %d in-flight request(s) any more",
                        model_server.config.drain_timeout_s, len(self.server_state.tasks))
            self.force_exit = True

    return Server(config)


def run_server(server: ModelServer, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serves ``server.app`` with uvicorn until SIGINT/SIGTERM, drains (see :class:`ServeConfig`), then exits."""
    server.freeze_gc_after_warm_up = True
    access_log = log_level.lower() in ("debug", "trace")
    config = uvicorn_config(server.app, max_connections=server.config.max_connections, refuse=server.over_capacity,
                            idle_timeout_s=server.config.idle_timeout_s, host=host, port=port, log_level=log_level,
                            access_log=access_log, proxy_headers=access_log)  # X-Forwarded-For: for the access log
    graceful_uvicorn(config, server, server.config.drain_grace_s).run()


def _submit(pool: Executor, fn: Any, *args: Any) -> asyncio.Future:
    """``fn(*args)`` submitted to ``pool`` (a submit may start a worker: with SIGINT/SIGTERM blocked); a pool shut
    down by the server's stopping answers 503."""
    with _signals_blocked():
        try:
            return asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except BrokenProcessPool:  # a RuntimeError too: the caller replaces the pool
            raise
        except RuntimeError as e:  # "cannot schedule new futures after shutdown"
            raise RequestError(503, "unavailable", "the server is shutting down") from e


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM blocked in this thread meanwhile. A codec worker started here inherits the mask, so a
    Ctrl-C to the process group cannot interrupt its imports (a traceback, a pool that never starts) before its
    initializer ignores both; this process handles such a signal once they are unblocked."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # (re)start it first: starting it unblocks both signals, undoing ours
    signals = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _codec_worker_init(niceness: int) -> None:
    """Codec worker start-up: ignore SIGINT and SIGTERM (a terminal's Ctrl-C, or a SIGTERM to the process group,
    reaches the workers too, but the server owns shutdown: it drains, then stops its workers), then unblock them
    (the server started this process with both blocked), and lower this process's CPU priority by ``niceness``
    (raising it needs privileges)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # `kill -- -PGID` too: the worker outlives the drain it serves
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # pending ones are dropped now
    if niceness > 0:
        os.nice(niceness)
