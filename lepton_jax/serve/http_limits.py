"""What keeps slow, stalled or too many clients from holding a server's resources: uvicorn's configuration.

- **Body-read timeout** (:func:`read_body`): a request body must arrive within ``body_timeout_s`` of the request's
  headers, else 408 (KServe error body) and the connection closes.
- **Idle timeout** (:func:`protocol_class`): a connection that has no request in progress for ``idle_timeout_s`` --
  a fresh one that sends nothing or trickles its headers, or a keep-alive one between requests -- is closed.
- **Connection cap**: the requests of connections beyond ``max_connections`` answer 503 (KServe error body,
  ``Retry-After``) and those connections close, so the server refuses load before it runs out of file descriptors.

The drain that bounds shutdown lives with the uvicorn server class (``server.graceful_uvicorn``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import resource
from collections.abc import Callable
from typing import Any

from lepton_jax.serve.kserve import RequestError, parse_size

__all__ = ["fit_connection_cap", "protocol_class", "read_body", "uvicorn_config"]

log = logging.getLogger("lepton_jax.serve")
SPARE_FILES = 128  # file descriptors beyond the connections: the model, codec workers' pipes, logs, the listener


async def read_body(receive: Any, limit: int, length: str | None, timeout_s: float) -> bytes:
    """The request body from ASGI ``receive``: refused (413) as soon as it is known to exceed ``limit`` bytes, and
    (408, ``Connection: close``) when it has not all arrived within ``timeout_s``."""
    if length is not None:
        if (size := parse_size(length)) is None:
            raise RequestError(400, "bad_request", f"Content-Length {length!r} is not a byte count")
        if size > limit:
            raise _too_large(limit)
    try:
        async with asyncio.timeout(timeout_s):
            return await _read(receive, limit)
    except TimeoutError as e:
        raise RequestError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s; send it "
                                                "at once", headers={"Connection": "close"}) from e


async def _read(receive: Any, limit: int) -> bytes:
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):  # the usual: one message
        body = message.get("body", b"")
        if len(body) > limit:
            raise _too_large(limit)
        return body
    chunks, size = [], 0
    while True:
        if message["type"] == "http.disconnect":
            raise RequestError(400, "disconnect", "the client went away before sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
        message = await receive()


def _too_large(limit: int) -> RequestError:
    return RequestError(413, "too_large", f"request body exceeds the limit of {limit} bytes; send fewer rows per "
                                          "request")


def protocol_class(max_connections: int, idle_timeout_s: float,
                   refuse: Callable[[], tuple[int, dict[str, str], bytes]]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools where installed, as uvicorn's ``auto`` picks, else h11) with the idle
    timeout and the connection cap; ``refuse()`` gives the over-cap answer (status, headers, body)."""
    if importlib.util.find_spec("httptools") is not None:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    async def over_capacity(scope: dict[str, Any], receive: Any, send: Any) -> None:
        status, headers, content = refuse()
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        raw += [(b"content-length", b"%d" % len(content)), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": content})

    class GuardedProtocol(base):  # type: ignore[valid-type, misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:  # this connection's requests are refused
                self.app = over_capacity
            self._idle_timer = self.loop.call_later(idle_timeout_s, self._close_if_idle)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle_timer.cancel()
            if not self.transport.is_closing():
                self._idle_timer = self.loop.call_later(idle_timeout_s, self._close_if_idle)

        def connection_lost(self, exc: Exception | None) -> None:
            self._idle_timer.cancel()
            super().connection_lost(exc)

        def _close_if_idle(self) -> None:
            """No request in progress (none yet, headers still trickling in, or the last one answered): close."""
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return GuardedProtocol


def fit_connection_cap(max_connections: int) -> int:
    """``max_connections``, within this process's open-file limit: the soft limit is raised toward the hard one as
    far as needed (``ulimit -n`` is often 1024); where even that is short, a lower cap (with a warning), so that the
    cap's 503 comes before accept() fails for want of file descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    if soft != resource.RLIM_INFINITY and soft < need:
        cap = max(1, soft - SPARE_FILES)
        log.warning("--max-connections %d needs %d open files but the limit is %d (ulimit -n): capping connections "
                    "at %d", max_connections, need, soft, cap)
        return cap
    return max_connections


def uvicorn_config(app: Any, *, max_connections: int, idle_timeout_s: float,
                   refuse: Callable[[], tuple[int, dict[str, str], bytes]], **options: Any) -> Any:
    """A ``uvicorn.Config`` for ``app`` with the idle timeout and connection cap; ``options`` go to uvicorn. Its own
    graceful-shutdown timeout stays off: the server's drain bounds shutdown and answers what is left with KServe
    errors (uvicorn's would cancel them into plain-text 500s and tracebacks)."""
    import uvicorn

    return uvicorn.Config(app, http=protocol_class(fit_connection_cap(max_connections), idle_timeout_s, refuse),
                          timeout_keep_alive=max(1, round(idle_timeout_s)), timeout_graceful_shutdown=None,
                          **options)
