"""Signals during a server's start-up: Ctrl-C or SIGTERM while it imports, loads, compiles or warms up exits at once.

Python's default SIGINT handler raises ``KeyboardInterrupt`` wherever the main thread happens to be: inside an
import (a traceback), inside jax's garbage-collection callback (where it is printed as "Exception ignored" and
*lost*: the server went on to become ready), or while a native library tears down (a segfault). Start-up holds
nothing worth saving -- it only reads -- so :func:`exit_on_signals_during_start_up` makes both signals end the
process at once with one line on stderr and the shell's status (130 for SIGINT, 143 for SIGTERM), without running
any library's teardown. Once serving, the server installs its own handlers (drain, then exit 0) over these.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType

__all__ = ["exit_on_signals_during_start_up"]

_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _exit_now(sig: int, frame: FrameType | None) -> None:
    try:
        if (util := sys.modules.get("multiprocessing.util")) is not None:  # this process's named semaphores (the
            util._run_finalizers(0)  # codec pool's queues): unlinked, else the resource tracker warns about them
        line = f"{signal.Signals(sig).name} while the server starts or stops: exiting now\n"
        os.write(sys.stderr.fileno(), line.encode())
    finally:
        os._exit(_STATUS[signal.Signals(sig)])


@contextlib.contextmanager
def exit_on_signals_during_start_up() -> Iterator[None]:
    """SIGINT and SIGTERM exit the process at once meanwhile (handlers installed inside take over; the previous
    handlers come back afterwards). Main thread only; elsewhere it does nothing."""
    try:
        previous = {sig: signal.signal(sig, _exit_now) for sig in _STATUS}
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
