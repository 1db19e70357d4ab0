"""Ingest's worker processes end with the ingest, even when it is SIGKILLed; dtypes a lake cannot hold are refused."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lepton_jax.errors import LakeError
from lepton_jax.lake import Lake, NpzSource, ingest

INGEST = """
import sys
from lepton_jax.lake import Lake, NpzSource, ingest
ingest(Lake(sys.argv[1]), "t", NpzSource(sys.argv[2], value_range=(0, 255)), workers=2)
"""


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] not in "ZX":
                out[int(entry.name)] = int(fields[1])
    return out


def _descendants(pid: int) -> set[int]:
    parents, found, todo = _parents(), set(), [pid]
    while todo:
        p = todo.pop()
        for child, parent in parents.items():
            if parent == p and child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_sigkilled_two_worker_ingest_leaves_no_process_behind(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(60):  # one chunk per file: the workers are busy for a while
        np.savez(src / f"part{k:03d}.npz", x=rng.integers(0, 256, (2000, 28, 28, 1), dtype=np.uint8),
                 y=rng.integers(0, 10, 2000))
    proc = subprocess.Popen([sys.executable, "-c", INGEST, str(tmp_path / "lake"), str(src)])
    try:
        deadline = time.monotonic() + 60
        family: set[int] = set()
        while time.monotonic() < deadline and len(family) < 3 and proc.poll() is None:  # fork server + 2 workers
            family |= _descendants(proc.pid)
            time.sleep(0.05)
        assert len(family) >= 3, f"the ingest finished or never started its workers ({family})"
        time.sleep(0.5)
        family |= _descendants(proc.pid)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(5)
    alive = family & set(_parents())
    for pid in alive:  # leave nothing behind, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"{len(alive)} of the ingest's {len(family)} processes outlived it by 5 s"


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128, np.dtype("M8[s]")])
def test_dtypes_a_lake_cannot_hold_are_refused_in_one_line(tmp_path, dtype):
    (tmp_path / "src").mkdir()
    x = np.arange(180).reshape(20, 3, 3).astype(dtype)  # distinct examples
    np.savez(tmp_path / "src" / "part.npz", x=x, y=np.arange(20) % 2)
    with pytest.raises(LakeError) as err:
        ingest(Lake(tmp_path / "lake"), "t", NpzSource(tmp_path / "src", value_range=(0, 200)))
    assert "\n" not in str(err.value) and f"dtype {np.dtype(dtype)}" in str(err.value)
    assert not (tmp_path / "lake" / "t").exists()
