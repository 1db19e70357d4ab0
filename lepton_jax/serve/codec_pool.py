"""The server's codec worker processes: large request bodies are decoded, and large answers encoded, off the event loop.

Workers are spawned (forking a process that runs jax threads is unsafe), and a spawned worker imports only what the
functions it runs live in: this module and :mod:`lepton_jax.serve.kserve`, which need numpy and orjson but never
jax. A worker that imported jax would take seconds to start, and a server signalled meanwhile would wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from lepton_jax.serve.kserve import InferRequest, RequestError, Tensor, encode_response

__all__ = ["codec_pool", "encode_in_worker", "signals_blocked", "submit"]


def codec_pool(processes: int, niceness: int) -> Executor:
    """``processes`` codec worker processes, ``niceness`` below this one's CPU priority (two threads when 0)."""
    if processes > 0:
        return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(niceness,))
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="kserve-codec")


def encode_in_worker(request: InferRequest, outputs: list[Tensor], *, model_name: str,
                     model_version: str) -> tuple[bytes, dict[str, str]]:
    """:func:`encode_response` for a codec worker process: its headers as a plain (picklable) dict."""
    content, headers = encode_response(request, outputs, model_name=model_name, model_version=model_version)
    return content, dict(headers)


def submit(pool: Executor, fn: Any, *args: Any) -> asyncio.Future:
    """``fn(*args)`` submitted to ``pool`` (a submit may start a worker: with SIGINT/SIGTERM blocked); a pool shut
    down by the server's stopping answers 503."""
    with signals_blocked():
        try:
            return asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except BrokenProcessPool:  # a RuntimeError too: the caller replaces the pool
            raise
        except RuntimeError as e:  # "cannot schedule new futures after shutdown"
            raise RequestError(503, "unavailable", "the server is shutting down") from e


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
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


def _worker_init(niceness: int) -> None:
    """Codec worker start-up: ignore SIGINT and SIGTERM (a terminal's Ctrl-C, or a SIGTERM to the process group,
    reaches the workers too, but the server owns shutdown: it drains, then stops its workers), then unblock them
    (the server started this process with both blocked), and lower this process's CPU priority by ``niceness``
    (raising it needs privileges)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # `kill -- -PGID` too: the worker outlives the drain it serves
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # pending ones are dropped now
    if niceness > 0:
        os.nice(niceness)
