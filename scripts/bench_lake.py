"""Benchmark the lake: random-access examples/s through a Grain pipeline, ingest MB/s, commit latency vs versions.

Random access compares, on the same examples and the same Grain pipeline as training (``ShuffledBatches``: Grain's
seeded per-epoch shuffle, one index array per batch, one batched read per batch), three sources: the lake (zarr v3,
sharded, in the default raw layout: inner chunks of about 64 KiB, ``bytes`` + ``crc32c``), Grain's
``ArrayRecordDataSource`` over an ArrayRecord file holding the same examples (``group_size:1``, one record per
example), and a numpy memmap of the raw bytes (the page-cache limit). Everything is read from a warm page cache after
one untimed pass. The lake is timed twice: "uncached" opens the split with a TensorStore cache exactly the size of its
shard indices (no floor), "cached" with the default 64 MiB cache. Local raw-layout shards are served by the raw fast
path (:mod:`lepton_jax.lake.rawshards`: one numpy gather per shard per batch, no TensorStore cache involved, so both
regimes take the same path; it checks every row it returns against the fragment's stored row hashes, inside the timed
loop); tables in
the zstd layout go through TensorStore, where the cache matters. ``--fragments K`` ingests the data as K appends (K
fragments per split) to time reads across fragments; the layout (codecs, examples per inner chunk and shard, read
path) is printed.

    .venv/bin/python scripts/bench_lake.py            # ~1-2 minutes on 2 CPU cores
    .venv/bin/python scripts/bench_lake.py --examples 20000 --batches 50   # quicker

Needs the ``bench`` extra (array-record). The work directory is a temp dir, removed at the end (unless ``--dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grain
import numpy as np

from lepton_jax.data import LakeDataSource, ShuffledBatches
from lepton_jax.lake import Lake, NpzSource, ingest


def _examples(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digit-like synthetic images: smooth blobs with noise (compressible like real images, all distinct)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = rng.integers(0, 10, size=n)
    cy, cx = rng.uniform(4, shape[0] - 4, size=(2, n))
    blob = np.exp(-(((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / 18.0))
    images = np.clip(blob * 200 + rng.normal(0, 12, size=(n, *shape)), 0, 255).astype(np.uint8)
    return images[..., None], labels


def _throughput(read_batch, n: int, batch: int, batches: int, seed: int, threads: int) -> float:
    ds = ShuffledBatches(n, batch, seed).repeat().map(read_batch)  # any number of batches, epoch after epoch
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads)))
    next(it)  # warm-up: opens files, fills the shard-index cache
    start = time.perf_counter()
    for _ in range(batches):
        out = next(it)
        assert out["image"].shape[0] == batch
    return batches * batch / (time.perf_counter() - start)


def _print_layout(tv, reader, root: Path) -> None:
    """The train split's image layout (codecs, examples per inner chunk and shard) and which read path serves it;
    times opening the split and touching every shard once (before any timing)."""
    frags = tv.fragments("train")
    meta = json.loads((root / tv.table / frags[0]["arrays"]["image"]["path"] / "zarr.json").read_text())
    conf = meta["codecs"][0]["configuration"]
    shards = sum(len(f["arrays"]["image"]["files"]) - 1 for f in frags)
    print(f"layout of train/image: codecs {[c['name'] for c in conf['codecs']]}, {conf['chunk_shape'][0]} examples "
          f"per inner chunk, {meta['chunk_grid']['configuration']['chunk_shape'][0]} per shard, {shards} shard(s)")
    files = [root / tv.table / f["arrays"]["image"]["path"] / k for f in frags for k in f["arrays"]["image"]["files"]
             if k != "zarr.json"]
    start = time.perf_counter()
    reader.read(np.unique(np.concatenate([np.arange(reader.offsets[f], reader.offsets[f + 1], 997)
                                          for f in range(len(frags))])))  # opens the split, touches every shard
    first = time.perf_counter() - start
    fast = bool(reader._raw) and all(r.get("image") is not None for r in reader._raw)
    mib = sum(p.stat().st_size for p in files) / 2**20
    path = ("in memory (the split's images are under SplitReader.SMALL_ARRAY_BYTES)" if "image" in reader._in_memory
            else "raw fast path (one numpy gather per shard per batch)" if fast else "TensorStore")
    print(f"read path: {path}; "
          f"opening the split and touching all {len(files)} image shard(s) ({mib:.1f} MiB) took {first:.2f} s"
          + " (once per process, before timing; every batch's rows are checked against their stored row hashes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=28, help="images are size x size x 1 uint8")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=150, help="timed batches per source and repeat")
    parser.add_argument("--read-threads", type=int, default=4, help="Grain read threads (the same for every source)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats per source (median)")
    parser.add_argument("--commits", type=int, default=40, help="versions to accumulate for commit latency")
    parser.add_argument("--fragments", type=int, default=1,
                        help="ingest as this many appends, so each split has this many fragments")
    parser.add_argument("--dir", default=None, help="work directory, kept (default: a temp dir, removed)")
    args = parser.parse_args()
    if args.examples < 2 * args.batch or args.fragments < 1:
        sys.exit(f"error: --examples must be at least 2 x --batch ({2 * args.batch}) and --fragments >= 1")
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    from array_record.python.array_record_module import ArrayRecordWriter

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_lake_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    try:
        _run(args, work, ArrayRecordDataSource, ArrayRecordWriter)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path, ArrayRecordDataSource, ArrayRecordWriter) -> None:  # noqa: N803 (classes passed in)
    images, labels = _examples(args.examples, (args.size, args.size), seed=0)
    mb = images.nbytes / 2**20
    print(f"{args.examples} examples of {images.shape[1:]} uint8 ({mb:.1f} MiB), batch {args.batch}, "
          f"{args.repeats} x {args.batches} timed batches per source, work dir {work}")

    # -- ingest ----------------------------------------------------------------------------------------------------
    parts = np.array_split(np.arange(args.examples), args.fragments)
    for k, idx in enumerate(parts):
        (work / f"src{k}").mkdir()
        np.savez(work / f"src{k}" / "part.npz", x=images[idx], y=labels[idx])
    import sklearn.model_selection  # noqa: F401  (a one-time ~2 s import the split needs; not ingest throughput)

    lake = Lake(work / "lake")
    start = time.perf_counter()
    for k in range(args.fragments):
        tv = ingest(lake, "bench", NpzSource(work / f"src{k}", value_range=(0, 255)),
                    splits={"train": 0.98, "test": 0.02}, mode="append").version
    ingest_s = time.perf_counter() - start
    print(f"ingest (validate, dedup, split, write, fsync, digest, commit; {args.fragments} commit(s)): "
          f"{ingest_s:.2f} s = {mb / ingest_s:.1f} MiB/s")
    print(f"layout: fragments per split {({s: len(tv.fragments(s)) for s in tv.splits})}, "
          f"examples per split {({s: tv.num_examples(s) for s in tv.splits})}")

    # the same examples, in the lake's train order, as ArrayRecord and as raw bytes for a memmap
    train = tv.reader("train").read()
    n = train["image"].shape[0]
    example_bytes = int(np.prod(train["image"].shape[1:]))
    writer = ArrayRecordWriter(str(work / "train.array_record"), "group_size:1")
    for img, lab in zip(train["image"], train["label"], strict=True):
        writer.write(img.tobytes() + int(lab).to_bytes(4, "little"))
    writer.close()
    train["image"].tofile(work / "train.images.raw")
    train["label"].tofile(work / "train.labels.raw")

    # The lake twice: with a cache just big enough for the shard index (every read decodes its chunk from the file:
    # the regime of a dataset much larger than memory), and with the default cache, which here holds most of the
    # decoded split after a few passes (the regime of a dataset that fits).
    index_bytes = 0  # one (offset, length) uint64 pair per inner chunk, plus a crc32c, per shard of every fragment
    for frag in tv.fragments("train"):
        meta = frag["arrays"]["image"]
        shards = len([f for f in meta["files"] if f != "zarr.json"])
        zarr = json.loads((work / "lake" / tv.table / meta["path"] / "zarr.json").read_text())
        chunks = (zarr["chunk_grid"]["configuration"]["chunk_shape"][0]
                  // zarr["codecs"][0]["configuration"]["chunk_shape"][0])
        index_bytes += (16 * chunks + 4) * shards
    lake_src = LakeDataSource(tv.reader("train", cache_bytes=index_bytes))
    print(f"uncached lake: cache of {index_bytes} bytes = the shard indices of the train split (no floor)")
    lake_cached_src = LakeDataSource(tv.reader("train"))
    _print_layout(tv, lake_src.reader, work / "lake")
    ar_src = ArrayRecordDataSource([str(work / "train.array_record")])
    shape = train["image"].shape[1:]
    mm_images = np.memmap(work / "train.images.raw", dtype=np.uint8, mode="r", shape=(n, *shape))
    mm_labels = np.memmap(work / "train.labels.raw", dtype=np.int32, mode="r", shape=(n,))

    def read_lake(idx):
        return lake_src.__getitems__(idx)

    def read_lake_cached(idx):
        return lake_cached_src.__getitems__(idx)

    def read_array_record(idx):
        records = ar_src.__getitems__([int(i) for i in idx])
        raw = np.frombuffer(b"".join(records), dtype=np.uint8).reshape(len(records), example_bytes + 4)
        return {"image": raw[:, :example_bytes].reshape(len(records), *shape),
                "label": raw[:, example_bytes:].copy().view(np.int32)[:, 0]}

    def read_memmap(idx):
        idx = np.asarray(idx)
        return {"image": np.asarray(mm_images[idx]), "label": np.asarray(mm_labels[idx])}

    # correctness first: all three return the same examples for the same indices
    probe = np.random.default_rng(1).integers(0, n, size=64)
    a, b, c = read_lake(probe), read_array_record(probe), read_memmap(probe)
    assert all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k]) for k in ("image", "label"))

    sources = {"lake": read_lake, "lake (cached)": read_lake_cached, "arrayrecord": read_array_record,
               "memmap": read_memmap}
    for fn in sources.values():  # untimed pass: warm page cache
        _throughput(fn, n, args.batch, max(1, args.batches // 3), seed=7, threads=args.read_threads)
    # interleaved repeats (lake, arrayrecord, memmap, lake, ...) so drift in machine load hits every source alike
    samples = {name: [] for name in sources}
    for rep in range(args.repeats):
        for name, fn in sources.items():
            samples[name].append(_throughput(fn, n, args.batch, args.batches, seed=11 + rep, threads=args.read_threads))
    rates = {name: statistics.median(v) for name, v in samples.items()}
    for name, rate in rates.items():
        spread = ", ".join(f"{v:,.0f}" for v in samples[name])
        print(f"random access via Grain, {name:13s}: {rate:10,.0f} examples/s  (median of {spread})")
    print(f"ratio lake / ArrayRecord: {rates['lake'] / rates['arrayrecord']:.2f}x   "
          f"lake / memmap: {rates['lake'] / rates['memmap']:.3f}x   "
          f"lake (cached) / ArrayRecord: {rates['lake (cached)'] / rates['arrayrecord']:.2f}x")

    # -- commit latency as versions accumulate ------------------------------------------------------------------------
    small = {"train": {"image": images[:1000], "label": labels[:1000].astype(np.int32)}}
    schema = {"arrays": {}, "label_array": "label", "label_names": [str(i) for i in range(10)]}
    latencies = []
    for i in range(args.commits):
        start = time.perf_counter()
        lake.commit("latency", small, schema=schema, lineage={"i": i})
        latencies.append(time.perf_counter() - start)
    k = min(5, len(latencies) // 2)
    print(f"commit latency (1000 examples, {small['train']['image'].nbytes / 2**20:.2f} MiB each): "
          f"versions 1-{k} median {statistics.median(latencies[:k]) * 1e3:.1f} ms, "
          f"versions {len(latencies) - k + 1}-{len(latencies)} median {statistics.median(latencies[-k:]) * 1e3:.1f} ms")
    print(f"versions in the table: {len(lake.versions('latency'))}")
    print(f"layout: 1 process, {args.read_threads} Grain read threads, {os.cpu_count()} CPUs visible")


if __name__ == "__main__":
    main()
