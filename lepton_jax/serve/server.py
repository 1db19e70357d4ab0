"""A model server speaking the KServe v2 (Open Inference) protocol over HTTP: an ASGI app (Starlette) for uvicorn.

Endpoints::

    GET  /v2/health/live                 200 while the process runs
    GET  /v2/health/ready                200 once every model is warmed up (compiled for every batch bucket), else 503
    GET  /v2                             server metadata
    GET  /v2/models/{name}               model metadata: input/output names, datatypes, shapes, label names
    GET  /v2/models/{name}/ready
    POST /v2/models/{name}/infer         (also /v2/models/{name}/versions/{version}/infer)
    GET  /metrics                        Prometheus text format

Requests go through a :class:`~lepton_jax.serve.batcher.DynamicBatcher` per model, whose replicas sit on separate
devices. Bad requests get a 4xx JSON body ``{"error": "..."}`` that says what was expected; every failure
increments ``lepton_errors_total{kind=...}``. With a token configured, every endpoint except the health probes needs
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lepton_jax.data.transforms import input_array, input_bounds, input_spec, out_of_range, scale
from lepton_jax.serve.batcher import BatchInfo, DrainingError, DynamicBatcher, QueueFullError, Replica
from lepton_jax.serve.drift import DriftMonitor
from lepton_jax.serve.metrics import ServerMetrics

log = logging.getLogger("lepton_jax.serve")

DATATYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "INT8": np.int8, "INT16": np.int16,
             "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
             "UINT64": np.uint64}


@dataclasses.dataclass
class ServeConfig:
    """Batching, back-pressure, limits and monitoring of a :class:`ModelServer`."""

    max_batch_size: int = 32
    max_delay_ms: float = 2.0
    max_queue_rows: int = 1024
    request_timeout_s: float = 10.0
    max_body_bytes: int = 4 << 20
    max_request_rows: int = 1024
    replicas: int = 1
    token: str | None = None
    drain_timeout_s: float = 30.0
    drift_window: int = 1000
    drift_min_samples: int = 200
    drift_threshold: float = 0.25
    warm_up_on_startup: bool = True


class RequestError(Exception):
    """A request the server refuses: HTTP status, error kind (a metrics label) and a message for the caller."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


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
        model = cls.from_workdir(entry.workdir, name=entry.name, version=str(entry.version), step=entry.step,
                                 reference=entry.reference)
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

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [self.version], "platform": f"jax_{jax.default_backend()}",
                "inputs": [{"name": self.input_name, "datatype": "FP32", "shape": [-1, *self.example_shape]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.label_names)]},
                            {"name": "class", "datatype": "INT64", "shape": [-1]}],
                "parameters": {"label_names": self.label_names, "value_range": list(self.value_range),
                               **({"column_ranges": self.input_spec["column_ranges"]}
                                  if "column_ranges" in self.input_spec else {}),
                               "units": "raw values of the training lake table", **self.info}}

    def parse(self, body: Any, max_rows: int) -> np.ndarray:
        """A KServe v2 request body -> validated float32 rows ``(N, *example_shape)``."""
        expected = (f'expected a KServe v2 inference request {{"inputs": [{{"name": "{self.input_name}", '
                    f'"shape": [N, {", ".join(map(str, self.example_shape))}], "datatype": "FP32", "data": [...]}}]}}')
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or len(body["inputs"]) != 1 \
                or not isinstance(body["inputs"][0], dict):
            raise RequestError(400, "bad_request", f"malformed request: {expected}")
        spec = body["inputs"][0]
        name = spec.get("name")
        if name != self.input_name:
            raise RequestError(400, "bad_request", f"unknown input {name!r}; model {self.name!r} takes one input "
                                                   f"named {self.input_name!r}")
        datatype = spec.get("datatype")
        if datatype not in DATATYPES:
            raise RequestError(400, "datatype", f"input {name!r}: datatype {datatype!r} is not supported; expected "
                                                f"FP32 (or another numeric type: {', '.join(DATATYPES)})")
        shape = spec.get("shape")
        want = f"[N, {', '.join(map(str, self.example_shape))}]"
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise RequestError(400, "shape", f"input {name!r}: shape {shape!r} is not a list of sizes; expected {want}")
        example = list(self.example_shape)
        if shape[1:] == example[:-1] and example[-1] == 1:
            shape = [*shape, 1]
        if shape[1:] != example or not shape or shape[0] < 1:
            raise RequestError(400, "shape", f"input {name!r}: shape {spec['shape']} does not match the model; "
                                             f"expected {want} with N >= 1")
        if shape[0] > max_rows:
            raise RequestError(413, "too_large", f"input {name!r}: {shape[0]} rows exceed this server's limit of "
                                                 f"{max_rows} rows per request; split the request")
        try:
            values = np.asarray(spec.get("data"))
        except ValueError as e:
            raise RequestError(400, "datatype", f"input {name!r}: data is not a (nested) list of numbers: {e}") from e
        if values.dtype.kind not in "biuf":
            raise RequestError(400, "datatype", f"input {name!r}: data holds {values.dtype.kind!r}-kind values, not "
                                                f"numbers of datatype {datatype}")
        if values.size != math.prod(shape):
            raise RequestError(400, "shape", f"input {name!r}: data has {values.size} values but shape "
                                             f"{spec['shape']} needs {math.prod(spec['shape'])}")
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            bad = int((~np.isfinite(values.reshape(shape[0], -1))).any(axis=1).sum())
            raise RequestError(400, "non_finite", f"input {name!r}: {bad} example(s) contain NaN or inf; expected "
                                                  f"finite values in {list(self.value_range)}")
        if np.dtype(DATATYPES[datatype]).kind in "iu" and values.dtype.kind == "f" \
                and not np.all(values == np.round(values)):
            raise RequestError(400, "datatype", f"input {name!r}: datatype {datatype} but data holds fractions")
        rows = values.reshape(shape).astype(np.float32)
        why = out_of_range(rows, self.input_spec)
        if why is not None:
            raise RequestError(400, "range", f"input {name!r}: {why} (raw units of the lake table)")
        return rows

    def response(self, probabilities: np.ndarray, request_id: Any) -> dict[str, Any]:
        n, c = probabilities.shape
        out = {"model_name": self.name, "model_version": self.version,
               "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [n, c],
                            "data": probabilities.reshape(-1).tolist()},
                           {"name": "class", "datatype": "INT64", "shape": [n],
                            "data": probabilities.argmax(-1).tolist()}]}
        if request_id is not None:
            out["id"] = request_id
        return out


class _Deployment:
    """A served model with its batcher and drift monitor."""

    def __init__(self, model: ServedModel, config: ServeConfig, metrics: ServerMetrics,
                 devices: Sequence[Any] | None):
        self.model = model
        name = model.name
        self.drift = None
        if model.reference:
            self.drift = DriftMonitor(model.reference, model=name, window=config.drift_window,
                                      min_samples=config.drift_min_samples, threshold=config.drift_threshold,
                                      report=self._report_drift(metrics, name))
        self.batcher = DynamicBatcher(model.make_replicas(config.replicas, devices),
                                      max_batch_size=config.max_batch_size, max_delay_s=config.max_delay_ms / 1000,
                                      max_queue_rows=config.max_queue_rows, on_batch=self._on_batch(metrics, name),
                                      on_queue=metrics.queue_depth.labels(name).set)
        for replica in self.batcher.replicas:
            metrics.replica_inflight.labels(name, replica.name).set_function(lambda r=replica: r.inflight_rows)

    def _on_batch(self, metrics: ServerMetrics, name: str):
        def on_batch(info: BatchInfo) -> None:
            metrics.batch_size.labels(name).observe(info.size)
            for wait in info.queue_times:
                metrics.queue_time.labels(name).observe(wait)
            metrics.replica_batches.labels(name, info.replica).inc()
            metrics.replica_rows.labels(name, info.replica).inc(info.size)
            if self.drift:
                self.drift.observe(info.inputs, info.outputs.argmax(-1))
        return on_batch

    @staticmethod
    def _report_drift(metrics: ServerMetrics, name: str):
        def report(kind: str, group: str, value: float) -> None:
            if kind == "input":
                metrics.input_drift.labels(name, group).set(value)
            else:
                metrics.prediction_drift.labels(name).set(value)
        return report


class ModelServer:
    """Serves one or more :class:`ServedModel` s; ``app`` is the ASGI application."""

    def __init__(self, models: Sequence[ServedModel], config: ServeConfig | None = None,
                 devices: Sequence[Any] | None = None):
        self.config = config or ServeConfig()
        self.metrics = ServerMetrics()
        self.deployments = {m.name: _Deployment(m, self.config, self.metrics, devices) for m in models}
        self._ready = threading.Event()
        self._draining = False
        self.app = Starlette(routes=[
            Route("/v2/health/live", self.live), Route("/v2/health/ready", self.ready_endpoint),
            Route("/v2", self.server_metadata), Route("/v2/models/{name}", self.model_metadata),
            Route("/v2/models/{name}/ready", self.model_ready),
            Route("/v2/models/{name}/infer", self.infer, methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", self.infer, methods=["POST"]),
            Route("/metrics", self.metrics_endpoint),
        ], lifespan=self._lifespan)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._draining

    def warm_up(self) -> None:
        """Compiles every batch bucket on every replica, then marks the server ready (blocking; thread-safe)."""
        start = time.perf_counter()
        for dep in self.deployments.values():
            lo = dep.model.value_range[0]
            dep.batcher.warm_up(np.full(dep.model.example_shape, lo, np.float32))
        self._ready.set()
        self.metrics.ready.set(1)
        log.info("warm-up done in %.1f s: %s", time.perf_counter() - start,
                 {n: d.batcher.buckets for n, d in self.deployments.items()})

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette):
        for dep in self.deployments.values():
            dep.batcher.start()
        if self.config.warm_up_on_startup:
            threading.Thread(target=self.warm_up, name="warm-up", daemon=True).start()
        yield
        self._draining = True
        self.metrics.ready.set(0)
        await asyncio.gather(*(d.batcher.drain(self.config.drain_timeout_s) for d in self.deployments.values()))
        log.info("drained: %s", {n: d.batcher.stats() for n, d in self.deployments.items()})

    # -- endpoints -------------------------------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready_endpoint(self, request: Request) -> Response:
        if self.ready:
            return JSONResponse({"ready": True})
        reason = "draining" if self._draining else "warming up (compiling batch buckets)"
        return JSONResponse({"ready": False, "error": reason}, status_code=503)

    async def server_metadata(self, request: Request) -> Response:
        if (denied := self._authorize(request)) is not None:
            return denied
        from lepton_jax import __version__

        return JSONResponse({"name": "lepton_jax", "version": __version__, "extensions": [],
                             "models": sorted(self.deployments)})

    async def model_metadata(self, request: Request) -> Response:
        try:
            self._check_auth(request)
            return JSONResponse(self._deployment(request.path_params["name"]).model.metadata())
        except RequestError as e:
            return self._error(e)

    async def model_ready(self, request: Request) -> Response:
        try:
            self._check_auth(request)
            self._deployment(request.path_params["name"])
        except RequestError as e:
            return self._error(e)
        return JSONResponse({"name": request.path_params["name"], "ready": self.ready},
                            status_code=200 if self.ready else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        if (denied := self._authorize(request)) is not None:
            return denied
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def infer(self, request: Request) -> Response:
        start = time.perf_counter()
        name = request.path_params["name"]
        label = name if name in self.deployments else "unknown"
        try:
            self._check_auth(request)
            dep = self._deployment(name)
            version = request.path_params.get("version")
            if version is not None and version != dep.model.version:
                raise RequestError(404, "unknown_model", f"model {name!r} has no version {version!r} on this "
                                                         f"server; it serves version {dep.model.version}")
            if not self.ready:
                raise RequestError(503, "unavailable", "the server is draining" if self._draining else
                                   "the server is warming up; poll /v2/health/ready")
            body = await self._read_json(request)
            rows = dep.model.parse(body, self.config.max_request_rows)
            try:
                probabilities = await dep.batcher.infer(rows, timeout_s=self.config.request_timeout_s)
            except QueueFullError as e:
                raise RequestError(429, "queue_full", str(e)) from e
            except TimeoutError as e:
                raise RequestError(504, "timeout", f"no result within {self.config.request_timeout_s} s") from e
            except DrainingError as e:
                raise RequestError(503, "unavailable", str(e)) from e
            response = JSONResponse(dep.model.response(probabilities, body.get("id")))
        except RequestError as e:
            response = self._error(e)
        except Exception as e:  # a bug or a failed batch: report it, keep serving
            log.exception("inference failed")
            response = self._error(RequestError(500, "internal", f"internal error: {type(e).__name__}: {e}"))
        self.metrics.requests.labels(label, str(response.status_code)).inc()
        if response.status_code == 200:
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)
        return response

    # -- helpers ---------------------------------------------------------------------------------------------
    def _deployment(self, name: str) -> _Deployment:
        if name not in self.deployments:
            raise RequestError(404, "unknown_model", f"unknown model {name!r}; this server serves: "
                                                     f"{', '.join(sorted(self.deployments))}")
        return self.deployments[name]

    def _check_auth(self, request: Request) -> None:
        token = self.config.token
        if not token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise RequestError(401, "unauthorized", "missing or wrong bearer token: send 'Authorization: Bearer "
                                                    "<token>'")

    def _authorize(self, request: Request) -> Response | None:
        try:
            self._check_auth(request)
        except RequestError as e:
            return self._error(e)
        return None

    async def _read_json(self, request: Request) -> Any:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        too_large = RequestError(413, "too_large", f"request body exceeds the limit of {limit} bytes; send fewer "
                                                   "rows per request")
        if length and length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, "bad_json", f"request body is not valid JSON ({e}); expected a KServe v2 "
                                                'inference request {"inputs": [{"name", "shape", "datatype", '
                                                '"data"}]}') from e

    def _error(self, error: RequestError) -> Response:
        self.metrics.errors.labels(error.kind).inc()
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)


def run_server(server: ModelServer, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serves ``server.app`` with uvicorn until SIGINT/SIGTERM, then drains in-flight requests."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(server.app, host=host, port=port, log_level=log_level,
                                  timeout_graceful_shutdown=server.config.drain_timeout_s)).run()
