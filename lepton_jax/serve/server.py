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
import functools
import gc
import hmac
import logging
import math
import re
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import FrameType
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lepton_jax.serve.batcher import DrainingError, QueueFullError
from lepton_jax.serve.codec_pool import codec_pool, encode_in_worker, signals_blocked, submit
from lepton_jax.serve.http_limits import read_body, uvicorn_config
from lepton_jax.serve.kserve import (
    HEADER_LENGTH,
    JSON_HEADERS,
    RequestError,
    declares_more_than,
    decode_rows,
    encode_response,
    error_body,
    inflate_within,
)
from lepton_jax.serve.lifecycle import JSON_BYTES_PER_VALUE, Lifecycle, ServedModel  # noqa: F401 (re-exported)
from lepton_jax.serve.lifecycle import Deployment as _Deployment
from lepton_jax.serve.metrics import ServerMetrics
from lepton_jax.serve.settings import ServeConfig

log = logging.getLogger("lepton_jax.serve")

__all__ = ["ModelServer", "RequestError", "ServeConfig", "ServedModel", "run_server"]

_HEADER_LENGTH = HEADER_LENGTH.encode()
_REQUEST_HEADERS = (b"authorization", b"content-length", b"content-encoding", _HEADER_LENGTH)  # what _infer reads
_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


class ModelServer:
    """Serves one or more :class:`ServedModel` s; ``app`` is the ASGI application."""

    def __init__(self, models: Sequence[ServedModel], config: ServeConfig | None = None,
                 devices: Sequence[Any] | None = None):
        self.config = config or ServeConfig()
        self.metrics = ServerMetrics()
        self.lifecycle = Lifecycle(models, self.config, self.metrics, devices)  # load, warm up, follow, swap
        self.deployments = self.lifecycle.deployments  # the stable deployment of each model, by name
        self._ready = threading.Event()
        self._draining = self._abandoned = False
        self._shutting_down = threading.Event()  # the lifespan shutdown has begun
        self._stop_warm_up = threading.Event()  # set by the first signal: a compile in progress is the last one
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
        self._stop_warm_up.set()
        if not self._draining:
            self._draining = True
            self.metrics.ready.set(0)
            log.info("draining: readiness answers 503; still serving requests")

    def abandon(self) -> int:
        """A force quit: every queued or running inference request answers 503 now instead of being waited for (those
        still reading their body or decoding answer 503 when cancelled); returns how many were unfinished."""
        self._draining = self._abandoned = True
        self.metrics.ready.set(0)
        self.lifecycle.abandon("the server was force-quit before this request finished; retry on another replica")
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
        if not self.lifecycle.warm_up(self._stop_warm_up):
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
        self.lifecycle.start()  # batchers, drift tasks, and (with follow) the stage followers
        try:  # start every codec worker before traffic (each spawns on demand; one task each while none is idle)
            loop = asyncio.get_running_loop()
            with signals_blocked():  # each submit starts a worker here, with this thread's signal mask
                starting = [loop.run_in_executor(self._pool, math.prod, (1,))
                            for _ in range(max(1, self.config.codec_processes))]
            await asyncio.gather(*starting)
        except BrokenProcessPool:  # e.g. a script without `if __name__ == "__main__":` (spawn re-imports it)
            log.warning("codec worker processes did not start; decoding large bodies on threads instead")
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kserve-codec")
        warming = threading.Thread(target=self.warm_up, name="warm-up", daemon=True)
        if self.config.warm_up_on_startup:
            warming.start()
        yield
        self._shutting_down.set()
        self.begin_drain()
        await self.lifecycle.stop(self.config.drain_timeout_s)
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
        dep = None
        try:
            self._authorize_header(headers[b"authorization"] or "")
            dep = self.lifecycle.pick(name, version, route=True)
            dep.holders += 1  # this version answers, even if a newer one is swapped in meanwhile
            if not self._ready.is_set():
                raise RequestError(503, "unavailable", "the server is warming up; poll /v2/health/ready")
            if dep.batcher.draining:
                raise RequestError(503, "unavailable", "the server is shutting down")
            body = await read_body(receive, dep.body_limit, headers[b"content-length"], self.config.body_timeout_s)
            encoding, limit = headers[b"content-encoding"], self.config.inline_parse_bytes
            inline = None if declares_more_than(body, encoding, limit) else inflate_within(body, encoding, limit)
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
                    encode_in_worker, model_name=dep.model.name, model_version=dep.model.version),
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
        finally:
            if dep is not None:
                dep.holders -= 1
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
        return await self.lifecycle.infer(dep, rows, self.config.request_timeout_s)

    def _codec_pool(self) -> Executor:
        """The codec worker processes (``codec_processes``; threads when 0)."""
        return codec_pool(self.config.codec_processes, self.config.codec_niceness)

    async def _offload(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the codec worker pool (large bodies; small ones are cheaper inline)."""
        pool = self._pool
        try:
            return await submit(pool, fn, *args)
        except BrokenProcessPool:  # a worker died (killed, out of memory): a fresh pool, and this request once more
            if self._pool is pool:
                log.warning("a codec worker process died; starting new ones")
                self._pool = self._codec_pool()
                pool.shutdown(wait=False, cancel_futures=True)
            return await submit(self._pool, fn, *args)

    def _resolve(self, request: Request) -> _Deployment:
        """Auth, then the deployment named (and versioned) in the path, or a 401/404."""
        self._check_auth(request)
        return self._named(request.path_params["name"], request.path_params.get("version"))

    def _named(self, name: str, version: str | None) -> _Deployment:
        return self.lifecycle.pick(name, version)

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
            elif model_server.draining or grace_s <= 0 or not model_server._ready.is_set():  # never ready: no grace
                if model_server.draining:
                    log.info("%s: ending the grace period now", name)
                model_server.begin_drain()  # and the warm-up stops after the compile in progress
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


