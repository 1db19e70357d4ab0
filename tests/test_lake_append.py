"""Appends read what they add, not the table: the dedup and leak index and the content digest come from each
fragment's row hashes and labels (read once per process), never from its example arrays."""

import json
import subprocess
import sys

import numpy as np
import pytest

from lepton_jax.lake import Lake, NpzSource, ingest

PROBE = """
import json, sys
from pathlib import Path
import sklearn.model_selection  # noqa: F401  (imported before counting: the split needs it)
from lepton_jax.lake import Lake, NpzSource, ingest

def io():
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}

lake = Lake(sys.argv[1])
before = io()
tv = ingest(lake, "t", NpzSource(sys.argv[2], value_range=(0, 255)), splits={"train": 0.9, "test": 0.1},
            mode="append").version
after = io()
print(json.dumps({"rchar": after["rchar"] - before["rchar"], "rows": sum(tv.num_examples(s) for s in tv.splits)}))
"""


def _npz(folder, seed, n):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    np.savez(folder / "part.npz", x=rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), y=rng.integers(0, 10, n))
    return folder


@pytest.mark.slow
def test_a_one_percent_append_reads_a_small_fraction_of_the_table(tmp_path):
    """Counted by /proc/self/io (rchar: every byte a read call returned, page cache or not) in a fresh process, so
    nothing is cached from the first ingest: a 1% append to a 20,000-row table of 28x28 images reads the fragments'
    row hashes (32 bytes per row) and labels, its own source and what it wrote, not the 15.7 MB of images."""
    lake = Lake(tmp_path / "lake")
    ingest(lake, "t", NpzSource(_npz(tmp_path / "a", 0, 20_000), value_range=(0, 255)),
           splits={"train": 0.9, "test": 0.1})
    table_bytes = sum(p.stat().st_size for p in (tmp_path / "lake" / "t").rglob("*") if p.is_file())
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "lake"), str(_npz(tmp_path / "b", 1, 200))],
                         capture_output=True, text=True, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["rows"] == 20_200
    assert got["rchar"] <= 0.10 * table_bytes, (got, table_bytes)  # the old code read more than the whole table
