"""Benchmark the lake's two array layouts directly (no Grain): disk size and write speed, and the cost of one random
batch read from a raw shard by the fast path's mapped gather against ``os.preadv`` per example and a bare memmap.

    .venv/bin/python scripts/bench_lake_layout.py              # ~1 minute on 2 CPU cores
    .venv/bin/python scripts/bench_lake_layout.py --examples 20000 --repeats 3

The write side times ``arrays.write_array`` (TensorStore encode + fsync) with ``compression="none"`` (the raw layout)
and ``"zstd"`` on the same synthetic images as ``bench_lake.py``, interleaved, medians of ``--repeats``. The read side
takes random sorted batches of ``--batch`` indices within the array's first shard and times, per example: the fast
path (``RawArray.read``: one numpy gather over the mapped shard), ``os.preadv`` of each example into the result (the
Python-level alternative the design named), and numpy fancy indexing of a memmap of the same bytes laid out flat.
The work directory is a temp dir, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lake import _examples  # noqa: E402  (the same synthetic images)

from lepton_jax.lake import arrays, rawshards  # noqa: E402
from lepton_jax.lake.storage import LocalStorage  # noqa: E402


def _median(samples: list[float]) -> str:
    return f"{statistics.median(samples):.2f} (runs {', '.join(f'{v:.2f}' for v in samples)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=28, help="images are size x size x 1 uint8")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=300, help="timed read batches per method and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.examples < 2 * args.batch:
        sys.exit(f"error: --examples must be at least 2 x --batch ({2 * args.batch})")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"layout: 1 process, {os.cpu_count()} CPUs visible (shared/loaded unless run on an idle machine)")
    work = Path(tempfile.mkdtemp(prefix="bench_lake_layout_"))
    try:
        _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path) -> None:
    x, _ = _examples(args.examples, (args.size, args.size), seed=0)
    mib = x.nbytes / 2**20
    print(f"{args.examples} examples of {x.shape[1:]} uint8 ({mib:.1f} MiB)")
    storage = LocalStorage(work)
    rates: dict[str, list[float]] = {"none": [], "zstd": []}
    sizes = {}
    for rep in range(args.repeats):
        for compression in rates:
            key = f"{compression}{rep}"
            start = time.perf_counter()
            arrays.write_array(storage, key, x, compression=compression)
            rates[compression].append(mib / (time.perf_counter() - start))
            sizes[compression] = sum(p.stat().st_size for p in (work / key).rglob("*") if p.is_file()) / 2**20
            if rep < args.repeats - 1 or compression == "zstd":
                shutil.rmtree(work / key)
    for compression, r in rates.items():
        per_shard, per_chunk = arrays.shard_layout(x.shape, x.dtype, compression=compression)
        print(f"write_array compression={compression!r:7s}: {per_chunk} example(s) per inner chunk, {per_shard} per "
              f"shard; {sizes[compression]:.1f} MiB on disk ({sizes[compression] / mib:.2f}x raw); "
              f"MiB/s median {_median(r)}")

    key = f"none{args.repeats - 1}"
    raw = rawshards.open_raw(work / key, arrays.file_digests(storage, key), key)
    lay = raw.layout
    n = min(lay.per_shard, args.examples)
    x[:n].tofile(work / "flat.raw")
    flat = np.memmap(work / "flat.raw", np.uint8, "r", shape=(n, *x.shape[1:]))
    shard = work / key / lay.shard_key(0)
    fd = os.open(shard, os.O_RDONLY)
    index = np.frombuffer(shard.read_bytes()[-lay.index_bytes:-4], "<u8").reshape(-1, 2)
    chunks = -(-n // lay.per_chunk)
    assert np.all(np.diff(index[:chunks, 0].astype(np.int64)) == lay.chunk_bytes)  # chunks in order (as written)
    base, eb = int(index[0, 0]), lay.example_bytes

    def preadv(idx: np.ndarray) -> np.ndarray:
        off = base + (idx // lay.per_chunk) * lay.chunk_bytes + (idx % lay.per_chunk) * eb
        out = np.empty((idx.size, *x.shape[1:]), x.dtype)
        rows = out.reshape(idx.size, eb)
        for k, o in enumerate(off.tolist()):
            os.preadv(fd, [rows[k]], o)
        return out

    rng = np.random.default_rng(1)
    batches = [np.sort(rng.choice(n, args.batch, replace=False)) for _ in range(args.batches)]
    methods = {"fast path (RawArray.read)": raw.read, "os.preadv per example": preadv,
               "memmap fancy index": lambda idx: np.asarray(flat[idx])}
    for name, fn in methods.items():  # correctness first, and warm
        assert np.array_equal(fn(batches[0]), x[batches[0]]), name
    cost: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            for b in batches:
                fn(b)
            cost[name].append((time.perf_counter() - start) / (len(batches) * args.batch) * 1e6)
    os.close(fd)
    print(f"random sorted batches of {args.batch} within one shard ({n} examples), {args.batches} batches x "
          f"{args.repeats} interleaved repeats:")
    for name, c in cost.items():
        print(f"  {name:28s}: us per example, median {_median(c)}")
    fast = statistics.median(cost["fast path (RawArray.read)"])
    print(f"ratio os.preadv / fast path: {statistics.median(cost['os.preadv per example']) / fast:.1f}x   "
          f"fast path / memmap: {fast / statistics.median(cost['memmap fancy index']):.2f}x")


if __name__ == "__main__":
    main()
