"""Benchmark the lake against its peers on the same arrays: Lance (``pylance``, the columnar format AI teams use for
this job) and a numpy memmap of the raw bytes.

    .venv/bin/pip install -e '.[bench-lake]'                  # pylance: a benchmark extra, never a runtime dependency
    .venv/bin/python scripts/bench_lake_peers.py               # 100,000 x 28x28 uint8 + labels
    .venv/bin/python scripts/bench_lake_peers.py --examples 1000000 --repeats 3
    .venv/bin/python scripts/bench_lake_peers.py --shards 4 --workers 2 --skip-reads   # write, workers and appends

Measured in one run, interleaved (lake, Lance, memmap, then again), medians with the spread of ``--repeats`` runs:

- **write**: the lake's ``ingest`` (npz source of ``--shards`` files, one chunk each -> validate, dedup, split,
  statistics, write, fsync, digests, commit; also into a table whose rows are identified by sha256,
  ``row_hash="sha256"``, as every table was before xxh3-128), Lance ``write_dataset`` of a pyarrow table (image as
  ``fixed_size_binary``, label int32), numpy ``tofile`` + fsync; with ``--workers N`` also
  ``lepton-jax lake ingest --workers 1`` and ``--workers N`` as commands (a process each, start-up included: as
  users run it; in this process the workers would import this script's heavy ``__main__``), and their ratio.
- **random batches** (``--batch``, default 256): ``SplitReader.read`` (every row checked against its stored row
  hash), Lance ``take``, memmap fancy index; examples/s.
- **Grain loader**: the training pipeline's ``ShuffledBatches`` over each source, ``--read-threads`` threads.
- **1% append**, five times per system: time, bytes written and bytes read (``/proc/self/io`` wchar/rchar of this
  process, Lance's threads included). The lake's per-process cache of fragment row hashes is emptied before each
  append, as in a fresh process.
- **version 1 after 5 appends**: random batches of the first version (time travel) of each.

The load average is printed before and after: timings on a loaded machine are not comparable to an idle one's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lake import _examples, _throughput  # noqa: E402  (the same synthetic images and Grain loop)

from lepton_jax.lake import Lake, NpzSource, fragments, ingest  # noqa: E402


def _io() -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


def _stat(samples: list[float], unit: str = "") -> str:
    return (f"{statistics.median(samples):,.1f}{unit} (runs {', '.join(f'{v:,.1f}' for v in samples)})")


def _ratio(a: list[float], b: list[float]) -> str:
    return f"{statistics.median(a) / statistics.median(b):.2f}x"


def _arrow_table(images: np.ndarray, labels: np.ndarray):
    import pyarrow as pa

    n, width = images.shape[0], int(np.prod(images.shape[1:]))
    image = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(
        np.ascontiguousarray(images).reshape(-1))])
    return pa.table({"image": image, "label": pa.array(labels.astype(np.int32))})


def _lance_rows(table, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    image = table.column("image").combine_chunks()
    width = int(np.prod(shape))
    raw = np.frombuffer(image.buffers()[1], np.uint8)[image.offset * width:(image.offset + len(image)) * width]
    return {"image": raw.reshape(len(image), *shape), "label": table.column("label").to_numpy()}


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def _timed(fn: Callable[[], object]) -> tuple[float, dict[str, int]]:
    before, start = _io(), time.perf_counter()
    fn()
    elapsed, after = time.perf_counter() - start, _io()
    return elapsed, {k: after[k] - before[k] for k in ("rchar", "wchar")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=100, help="timed random batches per system and repeat")
    parser.add_argument("--read-threads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    parser.add_argument("--shards", type=int, default=1, help="npz files the source is split into (chunks)")
    parser.add_argument("--workers", type=int, default=None,
                        help="also time the lake's ingest with this many worker processes (interleaved)")
    parser.add_argument("--skip-reads", action="store_true",
                        help="only write and appends (no random batches, Grain loader or version-1 reads)")
    args = parser.parse_args()
    import lance

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_peers_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} CPUs; lance {lance.__version__}")
    try:
        _run(args, work, lance)
    finally:
        print(f"load average after: {os.getloadavg()}")
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path, lance) -> None:
    n, shape = args.examples, (args.size, args.size, 1)
    images, labels = _examples(n, shape[:2], seed=0)
    labels = labels.astype(np.int32)
    (work / "src").mkdir()
    bounds = np.linspace(0, n, args.shards + 1).astype(int)
    for k in range(args.shards):
        rows = slice(bounds[k], bounds[k + 1])
        np.savez(work / "src" / f"part{k:05d}.npz", x=images[rows], y=labels[rows])
    table = _arrow_table(images, labels)
    mb = images.nbytes / 2**20
    print(f"{n:,} examples of {shape} uint8 ({mb:.1f} MiB) + int32 labels, {args.repeats} interleaved repeats")
    import sklearn.model_selection  # noqa: F401  (a one-time import the lake's split needs; not write time)

    # -- write -------------------------------------------------------------------------------------------------------
    write = {"lake": [], "lake_sha256": [], "lance": [], "memmap": []}  # lake_sha256: a table with sha256 rows
    cli = {1: [], args.workers: []} if args.workers else {}
    for r in range(args.repeats):
        lake_root, lance_path, raw = work / f"lake{r}", work / f"lance{r}", work / f"raw{r}.u8"
        lakes = [("lake", lake_root, None), ("lake_sha256", work / f"lake_sha{r}", "sha256")]
        for name, root, row_hash in lakes if r % 2 == 0 else lakes[::-1]:  # the two orders alternate
            write[name].append(_timed(lambda lr=root, rh=row_hash: ingest(Lake(lr), "t", NpzSource(
                work / "src", value_range=(0, 255)), splits={"train": 1.0}, row_hash=rh))[0])
        shutil.rmtree(work / f"lake_sha{r}")  # (the default lakes serve the reads below)
        for w in cli:
            cli[w].append(_timed(lambda lr=work / f"lake_cli{w}_{r}", w=w: subprocess.run(
                [sys.executable, "-m", "lepton_jax.cli", "lake", "ingest", "--lake", str(lr), "--table", "t",
                 "--source", f"npz:{work / 'src'}", "--splits", "train=1.0", "--workers", str(w)],
                check=True, stdout=subprocess.DEVNULL))[0])
        write["lance"].append(_timed(lambda lp=lance_path: (lance.write_dataset(table, lp), _fsync_tree(lp)))[0])

        def save(path=raw):
            with open(path, "wb") as f:
                images.tofile(f)
                f.flush()
                os.fsync(f.fileno())

        write["memmap"].append(_timed(save)[0])
    print("write (MiB/s):")
    for k, v in write.items():
        print(f"  {k:>11}: {_stat([mb / s for s in v])}")
    print(f"  ratio lake / Lance: {_ratio([mb / s for s in write['lake']], [mb / s for s in write['lance']])}   "
          f"lake (xxh3_128 rows, the default) / lake (sha256 rows): "
          f"{_ratio([mb / s for s in write['lake']], [mb / s for s in write['lake_sha256']])}")
    if cli:
        for w, v in cli.items():
            print(f"  `lepton-jax lake ingest --workers {w}` (a process, start-up included): "
                  f"{_stat([mb / s for s in v])}")
        print(f"  ratio --workers {args.workers} / --workers 1: "
              f"{_ratio([mb / s for s in cli[args.workers]], [mb / s for s in cli[1]])}")
    batches = None if args.skip_reads else _reads(args, work, lance, n, shape, images)
    _appends(work, lance, n, shape)
    if batches is not None:
        _version1(args, work, lance, shape, batches)


def _reads(args, work: Path, lance, n: int, shape: tuple[int, ...], images: np.ndarray) -> list[np.ndarray]:
    """Random batches and the Grain loader over each system; returns the batches (for the version-1 reads)."""

    # -- random batches and Grain ------------------------------------------------------------------------------------
    lake = Lake(work / "lake0")
    tv = lake.table("t")
    reader = tv.reader("train")
    ds = lance.dataset(str(work / "lance0"))
    order = reader.read(slice(None))["image"]  # the lake's row order (its split shuffles) to check equality
    mm = np.memmap(work / "raw0.u8", dtype=np.uint8, mode="r", shape=(n, *shape))
    probe = np.sort(np.random.default_rng(1).choice(n, 64, replace=False))
    lance_probe = _lance_rows(ds.take(probe, columns=["image", "label"]), shape)
    assert np.array_equal(np.asarray(mm[probe]), lance_probe["image"])  # Lance and memmap hold the source order
    assert set(map(bytes, order)) == set(map(bytes, images))  # the lake holds the same examples
    systems = {
        "lake": lambda idx: reader.read(idx),
        "lance": lambda idx: _lance_rows(ds.take(idx, columns=["image", "label"]), shape),
        "memmap": lambda idx: {"image": np.asarray(mm[idx])},
    }
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, n, args.batch) for _ in range(args.batches)]
    for fn in systems.values():  # untimed pass: warm page cache and open files
        for idx in batches[:10]:
            fn(idx)
    rand = {k: [] for k in systems}
    grain = {k: [] for k in systems}
    for r in range(args.repeats):
        for k, fn in systems.items():
            start = time.perf_counter()
            for idx in batches:
                fn(idx)
            rand[k].append(len(batches) * args.batch / (time.perf_counter() - start))
        for k, fn in systems.items():
            grain[k].append(_throughput(fn, n, args.batch, args.batches, seed=r, threads=args.read_threads))
    print(f"random batches of {args.batch} (examples/s, every lake row checked against its stored row hash):")
    for k, v in rand.items():
        print(f"  {k:>6}: {_stat(v)}")
    print(f"  ratio lake / Lance take: {_ratio(rand['lake'], rand['lance'])}   "
          f"lake / memmap: {_ratio(rand['lake'], rand['memmap'])}")
    print(f"Grain loader, {args.read_threads} read threads (examples/s):")
    for k, v in grain.items():
        print(f"  {k:>6}: {_stat(v)}")
    print(f"  ratio lake / Lance: {_ratio(grain['lake'], grain['lance'])}   "
          f"lake / memmap: {_ratio(grain['lake'], grain['memmap'])}")
    return batches


def _appends(work: Path, lance, n: int, shape: tuple[int, ...]) -> None:
    """Five 1% appends to each system's table, interleaved."""
    k = max(1, n // 100)
    table_bytes = {"lake": sum(p.stat().st_size for p in (work / "lake0").rglob("*") if p.is_file()),
                   "lance": sum(p.stat().st_size for p in (work / "lance0").rglob("*") if p.is_file())}
    appends = {"lake": [], "lance": []}
    for a in range(5):
        new_images, new_labels = _examples(k, shape[:2], seed=100 + a)
        src = work / f"append{a}"
        src.mkdir()
        np.savez(src / "part.npz", x=new_images, y=new_labels.astype(np.int32))
        new_table = _arrow_table(new_images, new_labels.astype(np.int32))
        fragments._keys.clear()  # as in a fresh process: nothing of the table cached
        appends["lake"].append(_timed(lambda s=src: ingest(Lake(work / "lake0"), "t", NpzSource(
            s, value_range=(0, 255)), splits={"train": 1.0}, mode="append")))
        appends["lance"].append(_timed(lambda t=new_table: (
            lance.write_dataset(t, str(work / "lance0"), mode="append"), _fsync_tree(work / "lance0"))))
    print(f"1% append ({k:,} examples), 5 times each (table before: lake {table_bytes['lake'] / 1e6:.1f} MB, "
          f"Lance {table_bytes['lance'] / 1e6:.1f} MB):")
    for name, runs in appends.items():
        print(f"  {name:>6}: time {_stat([t * 1e3 for t, _ in runs], ' ms')}; read "
              f"{_stat([io['rchar'] / 1e6 for _, io in runs], ' MB')} = "
              f"{statistics.median(io['rchar'] for _, io in runs) / table_bytes[name] * 100:.2f}% of the table; "
              f"written {_stat([io['wchar'] / 1e3 for _, io in runs], ' kB')}")
    print(f"  ratio lake / Lance append time: "
          f"{_ratio([t for t, _ in appends['lake']], [t for t, _ in appends['lance']])}")


def _version1(args, work: Path, lance, shape: tuple[int, ...], batches: list[np.ndarray]) -> None:
    """Random batches of version 1 (time travel), after the appends."""
    v1_reader = Lake(work / "lake0").table("t", 1).reader("train")
    v1_lance = lance.dataset(str(work / "lance0"), version=1)
    v1 = {"lake": lambda idx: v1_reader.read(idx),
          "lance": lambda idx: _lance_rows(v1_lance.take(idx, columns=["image", "label"]), shape)}
    for fn in v1.values():
        fn(batches[0])
    v1_rates = {key: [] for key in v1}
    for _ in range(args.repeats):
        for key, fn in v1.items():
            start = time.perf_counter()
            for idx in batches:
                fn(idx)
            v1_rates[key].append(len(batches) * args.batch / (time.perf_counter() - start))
    print("version 1 after 5 appends, random batches (examples/s):")
    for key, v in v1_rates.items():
        print(f"  {key:>6}: {_stat(v)}")
    print(f"  ratio lake / Lance: {_ratio(v1_rates['lake'], v1_rates['lance'])}")


if __name__ == "__main__":
    main()
