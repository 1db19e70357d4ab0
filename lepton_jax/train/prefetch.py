"""Input prefetch for the training loop: batches are read, prepared and placed on devices in a background thread,
``depth`` batches ahead of the step. Each batch travels with the iterator state *after* it, so the checkpointed
data position is that of the batches the loop consumed, not of those read ahead."""

from __future__ import annotations

import queue
import threading
from typing import Any

from lepton_jax.data import to_global

_END = object()


class Prefetcher:
    """Wraps a Grain iterator (``next``, ``get_state``, ``set_state``); ``next(p)`` returns global device arrays."""

    def __init__(self, iterator: Any, sharding: Any, depth: int = 2):
        self.iterator, self.sharding, self.depth = iterator, sharding, depth
        self._state = iterator.get_state()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop.clear()
        self._thread = threading.Thread(target=self._fill, name="lepton-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    raw = next(self.iterator)
                except StopIteration:
                    self._queue.put(_END)
                    return
                item = (to_global(raw, self.sharding), self.iterator.get_state())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced in the consumer
            self._queue.put(e)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self.depth <= 0:
            batch = to_global(next(self.iterator), self.sharding)
            self._state = self.iterator.get_state()
            return batch
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def get_state(self) -> dict[str, Any]:
        """The iterator state after the last batch returned (what a checkpoint must hold)."""
        return self._state

    def set_state(self, state: dict[str, Any]) -> None:
        self.close()
        self.iterator.set_state(state)
        self._state = state

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.iterator.set_state(self._state)  # forget what was read ahead
