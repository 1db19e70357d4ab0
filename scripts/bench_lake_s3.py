"""What a random batch costs on an object store, per inner-chunk layout: bytes fetched and requests sent.

The lake's default raw layout packs about 64 KiB of examples into each inner chunk; on an object store a random read
goes through TensorStore, which fetches (and crc32c-checks) the whole chunk holding the example. The zstd layout
(``--compression zstd``) keeps one compressed example per chunk. This script writes the same synthetic digit-like
images (``bench_lake.py``'s, 28x28 uint8, compressible) to a local S3-compatible server (moto, 127.0.0.1, started
and stopped here) once per layout, then reads the same random batches through ``SplitReader.read`` (the loader's
path: one batched read per batch) from each, interleaved, and counts what TensorStore's S3 driver sent and received
(its ``/tensorstore/kvstore/s3/*`` metrics, exact counts, not timings):

- bytes fetched per example and the read amplification (bytes fetched / bytes of the examples asked for);
- GET requests per batch (TensorStore merges reads of nearby chunks of one shard into one request);
- the table's stored bytes.

Each reader's TensorStore cache holds its shard indices plus 1 MiB, so (nearly) every read fetches the chunk it needs:
the regime of a table much larger than memory (bench_lake.py's "uncached").

The batch wall times are printed too, but they are moto's (a Python server in this process, on this machine's
loopback), not S3's: on a real object store each request costs tens of milliseconds of latency, and bytes cost
bandwidth (and, across regions, money).

    .venv/bin/python scripts/bench_lake_s3.py                  # ~1 minute: 50,000 examples, 20 batches of 256
    .venv/bin/python scripts/bench_lake_s3.py --examples 200000 --batches 40

Needs the ``test`` extra (moto, boto3). Every temp directory is removed at the end.
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

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("none", "zstd")


def s3_counts() -> dict[str, int]:
    """TensorStore's cumulative S3 counters in this process: bytes read and read requests."""
    import tensorstore as ts

    out = {"bytes": 0, "requests": 0}
    for metric in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/s3/"):
        name = metric["name"].rsplit("/", 1)[-1]
        if name in ("bytes_read", "read"):
            out["bytes" if name == "bytes_read" else "requests"] += int(metric["values"][0]["value"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20, help="random batches per layout and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians)")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    from bench_lake import _examples

    from tests import s3

    work = Path(tempfile.mkdtemp(prefix="bench_lake_s3_"))
    server = None
    try:
        server, info = s3.start(work)
        os.environ.update(info.env)  # before TensorStore/obstore read their configuration
        from lepton_jax.lake import Lake, NpzSource, arrays, ingest

        images, labels = _examples(args.examples, (28, 28), seed=0)
        (work / "npz").mkdir()
        np.savez(work / "npz" / "part.npz", x=images, y=labels)
        example_bytes = images[0].nbytes
        print(f"command: python scripts/bench_lake_s3.py --examples {args.examples} --batch {args.batch} "
              f"--batches {args.batches} --repeats {args.repeats}")
        print(f"layout: 1 process, 2 CPUs visible; a local moto S3 server in this process on 127.0.0.1; "
              f"{args.examples:,} examples of 28x28x1 uint8 ({example_bytes} B each), split train=1.0")
        readers, stored = {}, {}
        for layout in LAYOUTS:
            lake = Lake(info.new_root(), compression=layout)
            start = time.perf_counter()
            tv = ingest(lake, "bench", NpzSource(work / "npz", value_range=(0, 255)), splits={"train": 1.0}).version
            meta = tv.fragments("train")[0]["arrays"]["image"]
            stored[layout] = sum(f["bytes"] for f in meta["files"].values())
            # a TensorStore cache that holds the shard indices plus 1 MiB (an exact fit lets the index be evicted and
            # fetched again): every read fetches its chunk, the regime of a table much larger than memory, where an
            # object store's cost per read matters
            per_shard, per_chunk = arrays.shard_layout(tuple(meta["shape"]), np.dtype(meta["dtype"]),
                                                       lake.target_shard_bytes, layout)
            index_bytes = (16 * (per_shard // per_chunk) + 4) * (len(meta["files"]) - 1)
            reader = tv.reader("train", cache_bytes=index_bytes + 2**20)
            reader.SMALL_ARRAY_BYTES = 2**20  # the labels are read whole, the images always from their shards
            reader.read(np.arange(2))  # opens the arrays
            readers[layout] = reader
            print(f"  {layout:>4}: ingested in {time.perf_counter() - start:.1f} s; images stored in "
                  f"{stored[layout] / 2**20:.1f} MiB ({len(meta['files']) - 1} shard(s), {per_chunk} example(s) per "
                  f"inner chunk); reader cache {index_bytes:,} bytes of shard indices + 1 MiB")
        rng = np.random.default_rng(1)
        per: dict[str, dict[str, list[float]]] = {k: {"bytes": [], "requests": [], "ms": []} for k in LAYOUTS}
        for rep in range(args.repeats):
            batches = [rng.choice(args.examples, args.batch, replace=False) for _ in range(args.batches)]
            for layout in (LAYOUTS if rep % 2 == 0 else LAYOUTS[::-1]):  # interleaved, order alternating
                reader = readers[layout]
                before, start = s3_counts(), time.perf_counter()
                for idx in batches:
                    out = reader.read(idx)
                    assert np.array_equal(out["image"], images[idx]), "read back different bytes"
                elapsed, after = time.perf_counter() - start, s3_counts()
                per[layout]["bytes"].append((after["bytes"] - before["bytes"]) / (args.batches * args.batch))
                per[layout]["requests"].append((after["requests"] - before["requests"]) / args.batches)
                per[layout]["ms"].append(1000 * elapsed / args.batches)

        def show(values: list[float], fmt: str) -> str:
            return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"

        print(f"\n{args.batches} random batches of {args.batch} per repeat, {args.repeats} interleaved repeats, "
              "median [min-max]; every batch checked against the source")
        print(f"{'layout':>8} {'stored MiB':>11} {'bytes fetched per example':>27} {'amplification':>18} "
              f"{'GET requests per batch':>24} {'ms per batch (moto)':>22}")
        for layout in LAYOUTS:
            amp = [b / example_bytes for b in per[layout]["bytes"]]
            print(f"{layout:>8} {stored[layout] / 2**20:>11.1f} {show(per[layout]['bytes'], ',.0f'):>27} "
                  f"{show(amp, '.1f') + 'x':>18} {show(per[layout]['requests'], '.0f'):>24} "
                  f"{show(per[layout]['ms'], '.0f'):>22}")
        raw, packed = (statistics.median(per[k]["bytes"]) for k in LAYOUTS)
        print(f"bytes fetched per random example, raw / zstd layout: {raw / packed:.1f}x; stored bytes, zstd / raw: "
              f"{stored['zstd'] / stored['none']:.2f}x")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
