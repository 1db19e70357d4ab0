"""Small npz sources and content views shared by the lake tests."""

from __future__ import annotations

import numpy as np

from lepton_jax.lake import NpzSource


def npz_shard(path, seed, n=64, shape=(8, 8, 1)):
    """An npz of ``n`` random uint8 examples, labels 0..2 and a ``split`` column (every 4th example is test)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    np.savez(path, x=x, y=np.arange(n) % 3, split=np.where(np.arange(n) % 4 == 0, "test", "train"))
    return path


def npz_source(path):
    return NpzSource(path, value_range=(0, 255), split_key="split")


def version_rows(tv):
    """The multiset of (example bytes, label) over every split of a version."""
    out = []
    for split in tv.splits:
        data = tv.reader(split).read_all()
        out += [img.tobytes() + bytes([lab]) for img, lab in zip(data["image"], data["label"], strict=True)]
    return sorted(out)


class DyingShard:
    """A chunk whose loading kills its worker process (SIGKILL, as the OOM killer would)."""

    def load(self):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class DyingSource:
    """An npz directory source whose last chunk kills the worker process that loads it."""

    name = "npz"

    def __init__(self, path):
        self.inner = npz_source(path)
        self.uri = self.inner.uri

    def tasks(self):
        return [*self.inner.tasks(), DyingShard()]


class ClockAhead:
    """A stand-in for the ``time`` module whose ``time()`` runs ``seconds`` ahead (patched into one module, so only
    that module's view of the clock is skewed: servers and file systems keep the real one)."""

    def __init__(self, seconds: float):
        import time

        self._time, self.seconds = time, seconds

    def __getattr__(self, name):
        return getattr(self._time, name)

    def time(self) -> float:
        return self._time.time() + self.seconds
