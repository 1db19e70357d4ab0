"""Named crash points for fault-injection tests.

Setting ``LEPTON_LAKE_CRASH_AT=<point>`` makes the process SIGKILL itself when a writer reaches ``<point>``, the
harshest crash there is (no cleanup, no ``finally``). Points, in the order a commit passes them:

``shard``      after the first shard file of the first array is written (the array is half written)
``array``      after the first array is complete
``data``       after every array is written and fsynced
``record``     after the commit record's temp file is written and fsynced, before it is published
``published``  after the record is linked into the log, before the log directory is fsynced
``committed``  after the commit returned, before ingest returns
"""

from __future__ import annotations

import os
import signal

ENV = "LEPTON_LAKE_CRASH_AT"
POINTS = ("shard", "array", "data", "record", "published", "committed")


def armed(*points: str) -> bool:
    """Whether ``LEPTON_LAKE_CRASH_AT`` names one of ``points`` (a writer then takes its slower step-by-step path
    so that the point falls where the tests expect it)."""
    return os.environ.get(ENV) in points


def crash_point(point: str) -> None:
    """Kills this process with SIGKILL if ``LEPTON_LAKE_CRASH_AT`` names ``point``; otherwise does nothing."""
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
