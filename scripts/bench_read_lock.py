"""The lake's process-wide lock on raw fast-path reads against no lock: the Grain loader over one table.

Raw reads (``SplitReader`` over local raw-layout shards) run one at a time per process (``lepton_jax.lake.read``:
``_RAW_LOCK``). This measures why: the training pipeline's Grain loader (``ShuffledBatches`` -> one batched read per
batch, ``--read-threads`` threads) over the same table with the lock and with it replaced by a no-op, the two sides
interleaved in one run, a fresh reader per run; medians, every sample and the per-pair ratio. ``--drop-caches`` drops
the page cache before each run (root only), for reads that fault their pages in.

    .venv/bin/python scripts/bench_read_lock.py                    # 400,000 rows in 20 fragments, ~1 minute
    .venv/bin/python scripts/bench_read_lock.py --fragments 1      # one fragment
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lake import _examples, _throughput  # noqa: E402  (the same synthetic images and Grain loop)

import lepton_jax.lake.read as lake_read  # noqa: E402
from lepton_jax.lake import Lake, NpzSource, ingest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=400_000)
    parser.add_argument("--fragments", type=int, default=20, help="npz files ingested as one commit: a fragment each")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=300, help="timed batches per run")
    parser.add_argument("--read-threads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before each run (root)")
    args = parser.parse_args()
    print("command: python scripts/bench_read_lock.py " + " ".join(sys.argv[1:]))
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} CPUs")
    work = Path(tempfile.mkdtemp(prefix="bench_read_lock_"))
    try:
        images, labels = _examples(args.examples, (28, 28), seed=0)
        (work / "src").mkdir()
        for k, part in enumerate(np.array_split(np.arange(args.examples), args.fragments)):
            np.savez(work / "src" / f"part{k:03d}.npz", x=images[part], y=labels[part])
        ingest(Lake(work / "lake"), "t", NpzSource(work / "src", value_range=(0, 255)), splits={"train": 1.0})
        fragments = len(Lake(work / "lake").table("t").fragments("train"))
        print(f"{args.examples:,} examples of (28, 28, 1) uint8 in {fragments} fragment(s); Grain loader with "
              f"{args.read_threads} read threads, {args.batches} batches of {args.batch} per run, "
              f"{args.repeats} interleaved repeats" + (", page cache dropped before each run" if args.drop_caches
                                                       else ", warm page cache"))
        lock = lake_read._RAW_LOCK
        sides = {"lock": lock, "no lock": contextlib.nullcontext()}
        rates: dict[str, list[float]] = {k: [] for k in sides}
        for r in range(args.repeats):
            for name, guard in sides.items():
                if args.drop_caches:
                    subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)
                lake_read._RAW_LOCK = guard
                reader = Lake(work / "lake").table("t").reader("train")
                rates[name].append(_throughput(reader.read, len(reader), args.batch, args.batches, seed=r,
                                               threads=args.read_threads))
        lake_read._RAW_LOCK = lock
        print("Grain loader (examples/s):")
        for name, v in rates.items():
            print(f"  {name:>7}: {statistics.median(v):,.0f} (runs {', '.join(f'{x:,.0f}' for x in v)})")
        pairs = [a / b for a, b in zip(rates["lock"], rates["no lock"], strict=True)]
        print(f"ratio lock / no lock: {statistics.median(rates['lock']) / statistics.median(rates['no lock']):.2f}x"
              f"   per pair: median {statistics.median(pairs):.2f} (min {min(pairs):.2f}, max {max(pairs):.2f})")
        print(f"load average after: {os.getloadavg()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
