"""Dynamic batching over replicas: requests queue up, are merged into batches, and run on the least-loaded replica.

A batch is dispatched when it holds ``max_batch_size`` rows or its oldest request has waited ``max_delay_s``
(whichever comes first) and a replica is free. Each replica runs one batch at a time on its own thread, so replicas
on different devices compute concurrently while the event loop keeps accepting requests. Batches are padded up to a
fixed set of bucket sizes (powers of two up to ``max_batch_size``) so each replica compiles once per bucket.

Fairness: each batch's rows are shared max-min fairly among the oldest queued requests (:func:`fair_shares`): a
request that fits its share goes whole, the larger ones split the rest equally, and a request larger than its share
leaves its other rows queued for later batches. So a 1-row request that arrives behind large ones runs in the very
next batch (beside their rows, which keep the batch full), not after one chunk of each of them.

Back-pressure: the queue holds at most ``max_queue_rows`` rows; a request that does not fit raises
:class:`QueueFullError` at once (HTTP 429). A request that waits longer than its timeout raises
:class:`asyncio.TimeoutError` and is dropped from the queue if it has not started.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np


class QueueFullError(RuntimeError):
    """The batcher's queue cannot take the request now; retry later."""


class DrainingError(RuntimeError):
    """The batcher is shutting down and takes no new requests."""


def bucket_sizes(max_batch_size: int) -> list[int]:
    """Powers of two below ``max_batch_size``, and ``max_batch_size`` itself."""
    sizes = [1 << i for i in range(max(1, int(max_batch_size)).bit_length()) if (1 << i) < max_batch_size]
    return [*sizes, int(max_batch_size)]


class Replica:
    """One copy of the model (e.g. on one device) that runs padded batches on its own worker thread.

    ``fn(rows) -> outputs`` maps an ``(B, ...)`` array to an ``(B, ...)`` array (B is always a bucket size).
    """

    def __init__(self, name: str, fn: Callable[[np.ndarray], np.ndarray]):
        self.name, self.fn = name, fn
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"replica-{name}")
        self.inflight_rows = 0
        self.batches = 0
        self.rows = 0

    def run_padded(self, rows: np.ndarray, bucket: int) -> np.ndarray:
        n = rows.shape[0]
        if bucket > n:
            rows = np.concatenate([rows, np.zeros((bucket - n, *rows.shape[1:]), rows.dtype)])
        return np.asarray(self.fn(rows))[:n]

    def close(self) -> None:
        self.executor.shutdown(wait=True)


@dataclasses.dataclass(eq=False, slots=True)
class _Request:
    """A queued request: its rows, the next one to hand to a batch, and the outputs of the parts that ran."""

    rows: np.ndarray
    future: asyncio.Future
    enqueued: float
    taken: int = 0
    done: int = 0
    parts: list[tuple[int, np.ndarray]] = dataclasses.field(default_factory=list)

    @property
    def untaken(self) -> int:
        return self.rows.shape[0] - self.taken

    def finish_part(self, start: int, outputs: np.ndarray) -> None:
        """Records the outputs of rows ``start:start + len(outputs)``; resolves the future once all rows ran."""
        self.done += outputs.shape[0]
        if self.done == self.rows.shape[0] and not self.parts:  # one part: the usual, no copy
            self.future.set_result(outputs)
            return
        self.parts.append((start, outputs))
        if self.done == self.rows.shape[0]:
            self.parts.sort(key=lambda part: part[0])  # several replicas may finish parts out of order
            self.future.set_result(np.concatenate([out for _, out in self.parts]))


_Part = tuple[_Request, int, int]  # a request's rows start:stop, in one batch


def fair_shares(untaken: list[int], room: int) -> list[int]:
    """Max-min fair shares of ``room`` rows over requests with ``untaken`` rows, in queue order: requests that fit an
    equal share get all their rows, the rest split what is left equally, and rows that do not divide equally (also:
    every row, when there are more requests than rows) go to the requests ahead in the queue."""
    shares = [0] * len(untaken)
    left = room
    by_size = sorted(range(len(untaken)), key=untaken.__getitem__)  # stable: queue order among equals
    for k, i in enumerate(by_size):
        waiting = len(by_size) - k
        if untaken[i] * waiting > left:  # this request and every larger one get the equal level
            level = left // waiting
            for j in by_size[k:]:
                shares[j] = level
            left -= level * waiting
            break
        shares[i] = untaken[i]
        left -= untaken[i]
    for i, n in enumerate(untaken):  # what did not divide equally (fewer rows than those at the level): a row each
        if left == 0:  # to the oldest of them
            break
        if n > shares[i]:
            shares[i] += 1
            left -= 1
    return shares


@dataclasses.dataclass
class BatchInfo:
    """What the batcher reports after each batch (for metrics and monitoring)."""

    replica: str
    size: int
    bucket: int
    queue_times: list[float]
    inputs: np.ndarray
    outputs: np.ndarray


class DynamicBatcher:
    """Merges concurrent requests into bucketed batches and spreads them over replicas."""

    def __init__(self, replicas: list[Replica], *, max_batch_size: int = 32, max_delay_s: float = 0.002,
                 max_queue_rows: int = 1024, on_batch: Callable[[BatchInfo], None] | None = None):
        if not replicas:
            raise ValueError("a batcher needs at least one replica")
        self.replicas = replicas
        self.max_batch_size, self.max_delay_s = int(max_batch_size), float(max_delay_s)
        self.max_queue_rows = int(max_queue_rows)
        self.buckets = bucket_sizes(self.max_batch_size)
        self._on_batch = on_batch
        self._queue: collections.deque[_Request] = collections.deque()  # requests with untaken rows, oldest first
        self.queued_rows = 0
        self._round_robin = itertools.count()
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._free: asyncio.Event | None = None
        self._inflight: dict[asyncio.Future, list[_Part]] = {}  # running batches
        self._draining = False

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the scheduler on the running event loop."""
        self._wake, self._free = asyncio.Event(), asyncio.Event()
        self._free.set()
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name="batcher")

    async def drain(self, timeout_s: float = 15.0) -> None:
        """Stops taking requests, finishes queued and running batches (up to ``timeout_s``), then stops."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while (self._queue or self._inflight) and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.005)
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for request in self._queue:
            if not request.future.done():
                request.future.set_exception(DrainingError("the server shut down before this request ran"))
        self._queue.clear()
        # a running batch (one that abandon() stopped waiting for) ends on its thread, not on the event loop
        await asyncio.gather(*(asyncio.to_thread(replica.close) for replica in self.replicas))

    def abandon(self, reason: str) -> None:
        """A force quit: stops taking requests and fails every queued or running one with :class:`DrainingError`
        (``reason``) at once instead of waiting for it. A batch already running on a replica still finishes there (it
        cannot be interrupted; :meth:`drain` then waits for its thread without blocking the event loop), unread."""
        self._draining = True
        requests = [*self._queue, *(request for batch in self._inflight.values() for request, _, _ in batch)]
        self._queue.clear()
        self._inflight.clear()
        self.queued_rows = 0
        error = DrainingError(reason)
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)
        if self._wake is not None:
            self._wake.set()

    @property
    def draining(self) -> bool:
        return self._draining

    def warm_up(self, example: np.ndarray, stop: threading.Event | None = None) -> bool:
        """Compiles every bucket size on every replica (call from a worker thread, not the event loop); with
        ``stop``, checks it before each compile and returns False once it is set (True when all are compiled)."""
        for replica in self.replicas:
            for bucket in self.buckets:
                if stop is not None and stop.is_set():
                    return False
                replica.run_padded(np.repeat(example[None], bucket, axis=0), bucket)
        return True

    # -- requests --------------------------------------------------------------------------------------------
    async def infer(self, rows: np.ndarray, timeout_s: float | None = None) -> np.ndarray:
        """Runs ``rows`` (N, ...) through a replica as part of some batch; returns their outputs, in order."""
        if self._draining:
            raise DrainingError("the server is shutting down")
        n = rows.shape[0]
        if n == 0:
            raise ValueError("a request needs at least one row")
        if self.queued_rows + n > self.max_queue_rows:
            raise QueueFullError(f"the queue holds {self.queued_rows} of at most {self.max_queue_rows} rows and "
                                 f"cannot take {n} more; retry later")
        loop = asyncio.get_running_loop()
        request = _Request(rows, loop.create_future(), time.monotonic())
        was_idle = not self._queue
        self._queue.append(request)
        self.queued_rows += n
        if was_idle or self.queued_rows >= self.max_batch_size:  # else the scheduler's deadline comes first
            self._wake.set()
        timer = None if timeout_s is None else loop.call_later(timeout_s, self._time_out, request, timeout_s)
        try:
            return await request.future
        except BaseException:  # timed out, failed, or the caller went away (cancelled)
            self._cancel(request)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    @staticmethod
    def _time_out(request: _Request, timeout_s: float) -> None:
        if not request.future.done():
            request.future.set_exception(TimeoutError(f"no result within {timeout_s} s"))

    def _cancel(self, request: _Request) -> None:
        """Drops ``request``'s untaken rows from the queue; rows already running finish there, unread."""
        if not request.future.done():
            request.future.cancel()
        if request in self._queue:
            self._queue.remove(request)
            self.queued_rows -= request.untaken
            request.taken = request.rows.shape[0]


    # -- scheduling ------------------------------------------------------------------------------------------
    async def _schedule(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            replica = await self._free_replica()
            deadline = self._queue[0].enqueued + self.max_delay_s if self._queue else 0.0
            while self._queue and self.queued_rows < self.max_batch_size and not self._draining:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                replica.inflight_rows += sum(stop - start for _, start, stop in batch)  # busy from now on
                future = asyncio.ensure_future(self._run(replica, batch))
                self._inflight[future] = batch
                future.add_done_callback(lambda f: self._inflight.pop(f, None))

    async def _free_replica(self) -> Replica:
        """The idle replica with the fewest rows served (ties: round robin); waits while all are busy."""
        while True:
            idle = [r for r in self.replicas if r.inflight_rows == 0]
            if idle:
                start = next(self._round_robin) % len(idle)
                return min(idle[start:] + idle[:start], key=lambda r: r.rows)
            self._free.clear()
            await self._free.wait()

    def _take(self) -> list[_Part]:
        """The next batch: every queued row when they fit, else the fair shares (:func:`fair_shares`) of the oldest
        ``max_batch_size`` requests (a batch cannot hold a row of more). Requests with rows left go to the back of
        the queue, behind the ones that got nothing this time."""
        for request in [r for r in self._queue if r.future.done()]:  # timed out or cancelled while queued
            self._cancel(request)
        if self.queued_rows <= self.max_batch_size:  # the usual: everything queued fits
            batch = [(r, r.taken, r.rows.shape[0]) for r in self._queue]
            self._queue.clear()
        else:  # each of the oldest gets at least one row (fair_shares over at most `room` requests)
            head = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_size))]
            shares = fair_shares([r.untaken for r in head], self.max_batch_size)
            batch = [(r, r.taken, r.taken + share) for r, share in zip(head, shares, strict=True)]
            self._queue.extend(r for r, _, stop in batch if stop < r.rows.shape[0])
        for request, _, stop in batch:
            request.taken = stop
        self.queued_rows -= sum(stop - start for _, start, stop in batch)
        return batch

    async def _run(self, replica: Replica, batch: list[_Part]) -> None:
        rows = batch[0][0].rows[batch[0][1]:batch[0][2]] if len(batch) == 1 else np.concatenate(
            [request.rows[start:stop] for request, start, stop in batch])
        n = rows.shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        started = time.monotonic()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(replica.executor, replica.run_padded,
                                                                       rows, bucket)
        except Exception as e:  # a failed batch fails its requests, not the server
            for request, _, _ in batch:
                if not request.future.done():
                    request.future.set_exception(e)
            return
        finally:
            replica.inflight_rows -= n
            self._free.set()
        replica.batches += 1
        replica.rows += n
        offset = 0
        for request, start, stop in batch:
            if not request.future.done():
                request.finish_part(start, outputs[offset:offset + stop - start])
            offset += stop - start
        if self._on_batch:
            self._on_batch(BatchInfo(replica.name, n, bucket, [started - request.enqueued for request, _, _ in batch],
                                     rows, outputs))

    def stats(self) -> dict[str, Any]:
        return {"queued_rows": self.queued_rows, "replicas": {r.name: {"batches": r.batches, "rows": r.rows,
                                                                       "inflight_rows": r.inflight_rows}
                                                              for r in self.replicas}}
