"""SIGTERM and SIGINT outside the training loop's own handling (start-up, restore, compile, the final report).

Inside the loop a signal is a flag read once per step (:class:`lepton_jax.train.loop.Preemption`); around it,
:func:`raise_on_signals` turns either signal into :class:`Interrupted`, so the run unwinds (closing its files and
threads) instead of dying mid-write, and the CLI ends with one line: exit 0 when the training is saved (SIGTERM),
128 + the signal number otherwise (143 SIGTERM, 130 SIGINT). Standard library only: it is installed before the
heavy imports."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A SIGTERM or SIGINT that ended a run; ``saved_step`` is the step whose checkpoint holds the training when
    there is one (the loop sets it), else None."""

    def __init__(self, signum: int, saved_step: int | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved_step = signum, saved_step

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """0 for a SIGTERM after the training was saved (preemption is a normal end), else 128 + signal number."""
        return 0 if self.saved_step is not None and self.signum == signal.SIGTERM else 128 + self.signum


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`Interrupted` in the main thread while inside (elsewhere: no change); the
    previous handlers come back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
