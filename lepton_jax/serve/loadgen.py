"""A low-overhead HTTP/1.1 load generator on raw asyncio streams (uvloop when installed), for benchmarks and tests.

Each of ``concurrency`` workers keeps one keep-alive connection and sends pre-encoded requests back to back; a
response is read by its ``Content-Length`` with no header parsing beyond that, so the client spends a few tens
of microseconds of CPU per request (an httpx client spends milliseconds and ends up measuring itself). Every
request ends in exactly one :class:`Outcome`: a status code, ``refused`` (the connection could not be opened:
nothing was sent), or ``lost`` (sent, and the connection closed or reset before a full response).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Coroutine
from typing import Any


@dataclasses.dataclass
class Outcome:
    """One request: HTTP status (0 if none), ``refused``/``lost`` when there was no response, timing, headers."""

    status: int
    start: float
    end: float
    error: str | None = None
    headers: dict[bytes, bytes] | None = None
    body: bytes = b""

    @property
    def latency_s(self) -> float:
        return self.end - self.start


def http_request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                 host: str = "127.0.0.1") -> bytes:
    """The bytes of one HTTP/1.1 request (keep-alive)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return status, headers, body


async def drive(host: str, port: int, requests: Callable[[int], bytes], total: int, concurrency: int, *,
                keep_body: bool = False, on_response: Callable[[Outcome], None] | None = None,
                timeout_s: float = 60.0) -> list[Outcome]:
    """Sends ``requests(i)`` for ``i`` in ``range(total)`` over ``concurrency`` connections; outcomes in order.

    A response with ``Connection: close`` (or a dropped connection) makes the worker reconnect for its next
    request.
    """
    outcomes: list[Outcome | None] = [None] * total
    counter = iter(range(total))

    async def worker() -> None:
        reader = writer = None
        for i in counter:
            start = time.perf_counter()
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(host, port)
                except OSError as e:
                    outcomes[i] = Outcome(0, start, time.perf_counter(), f"refused: {type(e).__name__}")
                    continue
            try:
                writer.write(requests(i))
                status, headers, body = await asyncio.wait_for(_read_response(reader), timeout_s)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
                outcomes[i] = Outcome(0, start, time.perf_counter(), f"lost: {type(e).__name__}: {e}")
                writer.close()
                reader = writer = None
                continue
            outcome = Outcome(status, start, time.perf_counter(), None, headers, body if keep_body else b"")
            outcomes[i] = outcome
            if on_response:
                on_response(outcome)
            if headers.get(b"connection", b"").lower() == b"close":
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [o for o in outcomes if o is not None]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Runs ``coro`` on a uvloop event loop when uvloop is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
