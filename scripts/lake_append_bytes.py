"""What a 1% append reads of the table it appends to: local bytes (``/proc/self/io`` rchar of a fresh process) and,
with ``--s3``, bytes downloaded from a local S3 server (moto, as in the tests), beside the table's bytes.

    .venv/bin/python scripts/lake_append_bytes.py --examples 20000 [--s3]

Ingests ``--examples`` random 28x28 uint8 examples (train 0.9 / test 0.1), then appends 1% more in a fresh process
and prints what it read: in total, and besides its own npz source. On S3 it counts TensorStore's
``/tensorstore/kvstore/s3/bytes_read`` and every byte the lake's obstore client returns, for the first ingest (what
it downloads of what it uploaded) and for the append. Bytes are deterministic; no timing is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.test_lake_append import PROBE  # noqa: E402  (the test's fresh-process probe)


def _npz(folder: Path, seed: int, n: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    np.savez(folder / "part.npz", x=rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), y=rng.integers(0, 10, n))
    return folder


def _local(n: int, work: Path) -> None:
    from lepton_jax.lake import Lake, NpzSource, ingest

    ingest(Lake(work / "lake"), "t", NpzSource(_npz(work / "a", 0, n), value_range=(0, 255)),
           splits={"train": 0.9, "test": 0.1})
    table = sum(p.stat().st_size for p in (work / "lake" / "t").rglob("*") if p.is_file())
    source = _npz(work / "b", 1, n // 100)
    source_bytes = sum(p.stat().st_size for p in source.iterdir())
    out = subprocess.run([sys.executable, "-c", PROBE, str(work / "lake"), str(source)], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    got = json.loads(out.strip().splitlines()[-1])
    print(f"local: table {table:,} B; 1% append ({n // 100:,} rows) read {got['rchar']:,} B = "
          f"{100 * got['rchar'] / table:.2f}% of the table, {100 * (got['rchar'] - source_bytes) / table:.2f}% "
          f"besides its {source_bytes:,} B source; wrote {got['wchar']:,} B")


def _s3(n: int, work: Path) -> None:
    import tensorstore as ts

    from tests import s3

    server, info = s3.start(work)
    os.environ.update(info.env)
    from lepton_jax.lake import Lake, NpzSource, fragments, ingest
    from lepton_jax.lake.storage import ObjectStorage

    counted = [0]
    read, read_range, sha256 = ObjectStorage.read, ObjectStorage.read_range, ObjectStorage.sha256

    def counting_read(self, key):
        data = read(self, key)
        counted[0] += len(data)
        return data

    def counting_range(self, key, start, length):
        data = read_range(self, key, start, length)
        counted[0] += len(data)
        return data

    def counting_sha256(self, key):
        counted[0] += self.stat(key)[0]
        return sha256(self, key)

    ObjectStorage.read, ObjectStorage.read_range, ObjectStorage.sha256 = counting_read, counting_range, counting_sha256

    def downloaded() -> int:
        return counted[0] + sum(int(m["values"][0]["value"]) for m in ts.experimental_collect_matching_metrics(
            "/tensorstore/kvstore/s3/bytes_read"))

    try:
        root = info.new_root()
        start = downloaded()
        ingest(Lake(root), "t", NpzSource(_npz(work / "s3a", 0, n), value_range=(0, 255)),
               splits={"train": 0.9, "test": 0.1})
        first = downloaded() - start
        table = sum(size for size, _ in Lake(root).storage.list_recursive("t").values())
        fragments._keys.clear()  # as in a fresh process
        start = downloaded()
        ingest(Lake(root), "t", NpzSource(_npz(work / "s3b", 1, n // 100), value_range=(0, 255)),
               splits={"train": 0.9, "test": 0.1}, mode="append")
        append = downloaded() - start
        print(f"s3: table {table:,} B; the ingest downloaded {first:,} B ({100 * first / table:.3f}% of what it "
              f"uploaded); the 1% append downloaded {append:,} B = {100 * append / table:.2f}% of the table")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--s3", action="store_true", help="also on a local S3 server (moto)")
    args = parser.parse_args()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    work = Path(tempfile.mkdtemp(prefix="append_bytes_"))
    try:
        _local(args.examples, work)
        if args.s3:
            _s3(args.examples, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
