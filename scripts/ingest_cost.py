"""Where an npz ingest's CPU goes per chunk, and the best ratio to ``np.save`` that CPU allows on this machine.

    .venv/bin/python scripts/ingest_cost.py [--chunks 8] [--repeats 5]

Generates ``--chunks`` npz shards of 50,000 28x28 uint8 examples (``scripts/bench_ingest.py``'s data: 39.2 MB raw
each), then, on the first shard, times every step one ``lepton-jax lake ingest`` chunk runs, one step at a time, with
the library's own functions: CPU time of the whole process (``time.process_time``: every thread, TensorStore's
included) and wall time, medians of ``--repeats``. Beside them, in the same run: ``np.save`` + fsync of the same
arrays to the same disk (the benchmark's baseline; interleaved with the TensorStore write, each writer's previous
output deleted before it writes again), and real ``lepton-jax lake ingest`` processes over 2 shards and
over all of them (CPU of each child from ``getrusage``): their difference per extra shard is the CPU a chunk really
costs, the driver's decisions and the commit's share included and the process start-up excluded.

The arithmetic at the end is an upper bound, not a measurement of a faster ingest: a process cannot finish a chunk
faster than its CPU per chunk divided by the cores it may use, so ``np.save time / (CPU per chunk / cores)`` bounds
the ratio ``scripts/bench_ingest.py`` reports, with perfect overlap of every step. It is printed for the ingest as it
is, and with the steps a record-format change could remove (the source and array content digests, derived from the
row hashes instead of hashed again) or a native row hash could make nearly free.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_ingest import SHARD, _examples  # noqa: E402  (the benchmark's data, one generator)


def _timed(fn: Callable[[], object], repeats: int, setup: Callable[[], None] | None = None) -> tuple[float, float]:
    """Median (CPU ms, wall ms) of ``fn`` over ``repeats`` runs (``setup`` before each, untimed)."""
    cpu, wall = [], []
    for _ in range(repeats):
        if setup is not None:
            setup()
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append((time.process_time() - c) * 1e3)
        wall.append((time.perf_counter() - w) * 1e3)
    return statistics.median(cpu), statistics.median(wall)


def _ingest_cpu(lake: Path, source: Path, row_hash: str) -> tuple[float, float]:
    """(CPU ms, wall s) of one ``lepton-jax lake ingest`` process (CPU of the waited-for child, from getrusage)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lepton_jax.cli", "lake", "ingest", "--lake", str(lake), "--table", "t",
                    "--source", f"npz:{source}", "--row-hash", row_hash], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1e3, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=8,
                        help="npz shards for the end-to-end ingest (default 8; compared with an ingest of 2)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each step (median)")
    parser.add_argument("--row-hash", default="xxh3_128", choices=("xxh3_128", "sha256"),
                        help="the rows' identity hash the steps use (default: a new table's)")
    args = parser.parse_args()
    if args.chunks < 3 or args.repeats < 1:
        sys.exit("error: --chunks must be >= 3 and --repeats >= 1")
    cores = len(os.sched_getaffinity(0))
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"layout: 1 process, {cores} CPU(s) usable, load average {os.getloadavg()[0]:.1f} at start")
    work = Path(tempfile.mkdtemp(prefix="ingest_cost_"))
    try:
        _run(args, work, cores)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path, cores: int) -> None:
    from lepton_jax.lake import arrays, chunks, fragments, source_spec
    from lepton_jax.lake.storage import LocalStorage

    row_hash = args.row_hash
    shards = work / "npz"
    shards.mkdir()
    for k in range(args.chunks):
        x, y = _examples(SHARD, 1000 + k)
        np.savez(shards / f"part{k:05d}.npz", x=x, y=y)
    task = source_spec.make_source(f"npz:{shards}").tasks()[0]
    data = task.load()
    raw_mb = sum(v.nbytes for v in data.arrays.values()) / 1e6
    labels, names, _ = chunks._label_by_index(data, None, None)
    named = {"image": data.arrays["image"], "label": labels.astype(np.int32)}
    storage = LocalStorage(work / "lake")
    serial = iter(range(10**6))
    keys: list[str] = []

    def write() -> None:
        keys.append(f"w{next(serial)}")
        for name, value in named.items():
            arrays.start_write(storage, f"{keys[-1]}/{name}", value).finish("-")  # digest: its own step below

    def file_digests() -> None:
        for name in named:
            arrays.file_digests(storage, f"{keys[-1]}/{name}")

    def np_save() -> None:
        out = work / "save"
        out.mkdir()
        for name, value in (("x", data.arrays["image"]), ("y", data.labels)):
            with open(out / f"{name}.npy", "wb") as f:
                np.save(f, value)
                f.flush()
                os.fsync(f.fileno())

    def clear() -> None:  # both writers start from the same state: their previous output deleted (untimed)
        shutil.rmtree(work / "save", ignore_errors=True)
        if len(keys) > 1:
            storage.delete_prefix(keys[-2])

    def clean_chunk() -> None:  # what a chunk's cleaning runs: value checks, row hashes, in-chunk dedup
        keep, rejects = chunks._check_values(data, labels)
        chunks._dedup(data, labels, names, keep, rejects, fragments.row_hashes(data.arrays, row_hash=row_hash))

    write()  # TensorStore's first write starts its thread pools: not a chunk's cost
    steps: list[tuple[str, Callable[[], object], bool]] = [  # (what, fn, removable by a record-format change)
        ("read and check the npz (NpzShard.load)", task.load, False),
        ("source digest (SourceData.digest, sha256)", data.digest, True),
        (f"row hashes ({row_hash} per row, holds the GIL)",
         lambda: fragments.row_hashes(data.arrays, row_hash=row_hash), False),
        ("validate + clean, incl. row hashes (clean_chunk)", clean_chunk, False),
        ("statistics partials (partial_stats)", lambda: fragments.partial_stats(named), False),
        ("array content digests (sha256)", lambda: [arrays.content_digest(v) for v in named.values()], True),
        ("TensorStore write + fsync (raw layout)", write, False),
        ("file digests of the written shards (sha256)", file_digests, False),
    ]
    costs = {what: _timed(fn, args.repeats) for what, fn, _ in steps if fn is not write}
    pairs = [(_timed(write, 1, clear), _timed(np_save, 1, clear)) for _ in range(args.repeats)]  # interleaved
    costs["TensorStore write + fsync (raw layout)"] = tuple(statistics.median(p[0][i] for p in pairs) for i in (0, 1))
    save_cpu, save_wall = (statistics.median(p[1][i] for p in pairs) for i in (0, 1))
    costs = {what: costs[what] for what, _, _ in steps}
    print(f"\none chunk: {SHARD:,} examples, {raw_mb:.1f} MB raw; medians of {args.repeats} runs, one step at a time")
    print(f"{'step':48s} {'CPU ms':>8s} {'wall ms':>8s}")
    for what, (cpu, wall) in costs.items():
        print(f"{what:48s} {cpu:8.1f} {wall:8.1f}")
    print(f"{'np.save + fsync of the same arrays (baseline)':48s} {save_cpu:8.1f} {save_wall:8.1f}")
    clean = costs["validate + clean, incl. row hashes (clean_chunk)"][0]
    hashes = costs[f"row hashes ({row_hash} per row, holds the GIL)"][0]
    counted = [w for w, _, _ in steps if not w.startswith("row hashes")]  # clean_chunk holds the row hashes
    step_cpu = sum(costs[w][0] for w in counted)
    print(f"sum of the steps (the row hashes once, inside clean_chunk): {step_cpu:.1f} ms CPU per chunk "
          f"(clean_chunk without its row hashes: {clean - hashes:.1f})")

    few = work / "npz_first2"
    few.mkdir()
    for f in sorted(shards.glob("*.npz"))[:2]:
        os.link(f, few / f.name)
    runs: dict[int, list[tuple[float, float]]] = {2: [], args.chunks: []}
    for rep in range(2):  # interleaved: 2 shards, all shards, 2 shards, all shards
        for count, src in ((2, few), (args.chunks, shards)):
            runs[count].append(_ingest_cpu(work / f"e2e{count}_{rep}", src, row_hash))
    (cpu_few, _), (cpu_all, wall_all) = (tuple(statistics.median(v) for v in zip(*runs[c], strict=True))
                                         for c in (2, args.chunks))
    e2e_cpu = (cpu_all - cpu_few) / (args.chunks - 2)
    print(f"\nlepton-jax lake ingest, 1 worker, each a separate process (medians of 2 interleaved runs): "
          f"{args.chunks} shards {wall_all:.2f} s wall ({raw_mb * args.chunks / wall_all:.0f} MB/s), "
          f"{cpu_all:.0f} ms CPU; 2 shards {cpu_few:.0f} ms CPU; so each further chunk costs {e2e_cpu:.1f} ms CPU "
          "(the driver's decisions and the commit's share included, start-up not)")

    def bound(cpu_ms: float) -> str:
        return f"{save_wall / (cpu_ms / cores):.2f}x np.save"

    removable = sum(costs[w][0] for w, _, r in steps if r)
    print(f"\nbest ratio to np.save + fsync ({save_wall:.1f} ms per chunk here) that the CPU allows on {cores} "
          "core(s), every step overlapped perfectly:")
    print(f"  the ingest as it is ({e2e_cpu:.0f} ms CPU per chunk):                               {bound(e2e_cpu)}")
    print(f"  without the source and content digests ({e2e_cpu - removable:.0f} ms; a record-format change): "
          f"{bound(e2e_cpu - removable)}")
    print(f"  and with free row hashes ({e2e_cpu - removable - hashes:.0f} ms; a native batched hash):        "
          f"{bound(e2e_cpu - removable - hashes)}")


if __name__ == "__main__":
    main()
