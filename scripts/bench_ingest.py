"""Benchmark lake ingest at scale: throughput against np.save, peak memory, parallel workers, append cost.

Generates (at ``--scale 1``) about 1.5 GB: 2,000,000 synthetic 28x28 uint8 examples in npz shards of 50,000, and an
image folder of 50,000 files (half PNG, half JPEG, 10 label folders). Then, each ingest a separate
``lepton-jax lake ingest`` process (its wall time and the peak RSS of its largest process are measured):

- npz shards → a table; MB/s of the raw example bytes, against ``np.save`` of the same arrays (fsynced) to the same
  disk, timed in the same run (repeats interleaved, medians); peak RSS = VmHWM of the ingest process and its
  workers, polled from /proc; the same ingest with ``--workers 2`` (printed last, as an addition: the headline is
  one worker);
- the image folder with ``--workers 1`` and ``--workers 2`` (interleaved repeats, medians);
- ``--mode append`` of 1% new examples: bytes written (the new commit's files and record) against the table's bytes.

With ``--executor ray`` the script also starts a local Ray instance (``--ray-cpus`` CPUs, on 127.0.0.1) and times,
interleaved with the runs above, the same ingests with ``--executor ray --ray-address <it>``: each ingest a separate
driver joining the running cluster, as on a multi-node cluster (cluster start-up not timed; each driver's Ray worker
processes start inside its timing). Peak RSS of a Ray ingest is the driver's only (its tasks run in the cluster's
worker processes).

    .venv/bin/python scripts/bench_ingest.py --scale 0.02     # ~1 minute: 40,000 examples, 1,000 images
    .venv/bin/python scripts/bench_ingest.py                  # the full ~1.5 GB (several minutes, ~4 GB of disk)
    .venv/bin/python scripts/bench_ingest.py --scale 0.02 --executor ray --ray-cpus 2   # also as Ray tasks

Every temp directory is removed at the end (unless ``--dir``).
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
from pathlib import Path

import numpy as np

SHARD = 50_000


def _examples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digit-like 28x28 uint8 images (a blob plus noise: compressible like real images, all distinct)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    cy, cx = rng.uniform(6, 22, size=(2, n))
    blob = np.exp(-(((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / 18.0))
    images = np.clip(blob * 200 + rng.normal(0, 12, size=(n, 28, 28)), 0, 255).astype(np.uint8)
    return images, rng.integers(0, 10, size=n)


def _write_npz_shards(folder: Path, n: int, seed: int) -> int:
    folder.mkdir(parents=True)
    total = 0
    for k, start in enumerate(range(0, n, SHARD)):
        x, y = _examples(min(SHARD, n - start), seed * 1000 + k)
        np.savez(folder / f"part{k:05d}.npz", x=x, y=y)
        total += x.nbytes
    return total


def _write_images(folder: Path, n: int) -> int:
    from PIL import Image

    x, y = _examples(n, 99)
    for label in range(10):
        (folder / f"class{label}").mkdir(parents=True)
    for i in range(n):
        ext = "png" if i % 2 == 0 else "jpg"
        Image.fromarray(x[i]).save(folder / f"class{y[i]}" / f"{i:07d}.{ext}")
    return x.nbytes


def _np_save(folder: Path, src: Path) -> float:
    """Seconds to write every shard's arrays with np.save (and fsync them), as the baseline."""
    folder.mkdir(parents=True)
    start = time.perf_counter()
    for f in sorted(src.glob("*.npz")):
        with np.load(f) as d:
            x, y = d["x"], d["y"]
        for name, value in (("x", x), ("y", y)):
            path = folder / f"{f.stem}.{name}.npy"
            with open(path, "wb") as out:
                np.save(out, value)
                out.flush()
                os.fsync(out.fileno())
    return time.perf_counter() - start


def _hwm_mib(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, from /proc; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                for c in (t / "children").read_text().split()]
    except OSError:
        return []


RAY: tuple[str, ...] = ()  # extra CLI arguments of a Ray ingest (set in main)


def _start_ray(cpus: int) -> str:
    """Starts a local Ray instance in this process (loopback only); returns its address for the ingest drivers."""
    from lepton_jax.lake.ray_executor import SINGLE_MACHINE, import_ray

    os.environ.setdefault(SINGLE_MACHINE, "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = import_ray()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="error", log_to_driver=False)
    return ray.get_runtime_context().gcs_address


def _ingest(lake: Path, table: str, source: str, *extra: str) -> tuple[float, float]:
    """Runs one CLI ingest; returns (seconds, peak RSS in MiB of its largest process: the CLI or a worker).

    The peak is VmHWM from /proc, polled every 20 ms (per process image, so unlike getrusage it does not inherit the
    benchmark's own memory across fork/exec)."""
    cmd = [sys.executable, "-m", "lepton_jax.cli", "lake", "ingest", "--lake", str(lake), "--table", table,
           "--source", source, *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peaks: dict[int, float] = {}
    while proc.poll() is None:
        for pid in [proc.pid, *_children(proc.pid)]:
            peaks[pid] = max(peaks.get(pid, 0.0), _hwm_mib(pid))
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"error: ingest failed ({' '.join(cmd)}): {err.decode().strip().splitlines()[-1:]}")
    return seconds, max(peaks.values(), default=0.0)


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full size (1 = ~1.5 GB)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each timing (median)")
    parser.add_argument("--dir", default=None, help="work directory, kept (default: a temp dir, removed)")
    parser.add_argument("--executor", default="process", choices=["process", "ray"],
                        help="ray: also time every ingest as Ray tasks on a local Ray instance")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray instance (default 2)")
    args = parser.parse_args()
    if not 0 < args.scale <= 4 or args.repeats < 1 or args.ray_cpus < 1:
        sys.exit("error: --scale must be in (0, 4], --repeats >= 1 and --ray-cpus >= 1")
    global RAY
    if args.executor == "ray":
        RAY = ("--executor", "ray", "--ray-address", _start_ray(args.ray_cpus))
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"layout: 1 host, {os.cpu_count()} CPUs visible, work dir {work} (shared/loaded unless run on an idle "
          "machine)" + (f"; Ray: a local instance of {args.ray_cpus} CPU(s) at {RAY[-1]}" if RAY else ""))
    try:
        _run(args, work)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
        if RAY:
            import ray

            ray.shutdown()


def _run(args: argparse.Namespace, work: Path) -> None:
    n = max(SHARD // 50, int(2_000_000 * args.scale))
    n_images = max(200, int(50_000 * args.scale))
    t = time.perf_counter()
    raw = _write_npz_shards(work / "npz", n, seed=1)
    print(f"generated {n:,} examples of 28x28 uint8 in {len(list((work / 'npz').glob('*.npz')))} npz shard(s): "
          f"{raw / 1e6:,.0f} MB raw ({time.perf_counter() - t:.1f} s)")
    t = time.perf_counter()
    image_raw = _write_images(work / "images", n_images)
    print(f"generated {n_images:,} images (PNG + JPEG) in 10 label folders ({time.perf_counter() - t:.1f} s)")

    # -- npz shards vs np.save ----------------------------------------------------------------------------------------
    lake_s, save_s, rss, ray_s, ray_rss, two_s, two_rss = [], [], [], [], [], [], []
    for rep in range(args.repeats):
        s, r = _ingest(work / f"lake{rep}", "npz", f"npz:{work / 'npz'}")
        lake_s.append(s)
        rss.append(r)
        s, r = _ingest(work / f"two{rep}", "npz", f"npz:{work / 'npz'}", "--workers", "2")
        two_s.append(s)
        two_rss.append(r)
        shutil.rmtree(work / f"two{rep}")
        save_s.append(_np_save(work / f"npy{rep}", work / "npz"))
        shutil.rmtree(work / f"npy{rep}")
        if rep:
            shutil.rmtree(work / f"lake{rep}")
        if RAY:
            s, r = _ingest(work / f"ray{rep}", "npz", f"npz:{work / 'npz'}", *RAY)
            ray_s.append(s)
            ray_rss.append(r)
            shutil.rmtree(work / f"ray{rep}")
    lake_mb = [raw / 1e6 / s for s in lake_s]
    save_mb = [raw / 1e6 / s for s in save_s]
    print(f"npz ingest (CLI process, 1 worker): {statistics.median(lake_mb):,.1f} MB/s "
          f"(runs {', '.join(f'{v:,.1f}' for v in lake_mb)}); np.save + fsync of the same bytes: "
          f"{statistics.median(save_mb):,.1f} MB/s (runs {', '.join(f'{v:,.1f}' for v in save_mb)})")
    print(f"ratio ingest / np.save: {statistics.median(lake_mb) / statistics.median(save_mb):.3f}x  (goal >= 0.5x)")
    print(f"peak RSS of the ingest process: {max(rss):,.0f} MiB (runs {', '.join(f'{v:,.0f}' for v in rss)}; "
          "goal <= 1024 MiB)")
    two_mb = [raw / 1e6 / s for s in two_s]
    two_line = (f"npz ingest (CLI process + 2 worker processes, --workers 2; timed interleaved with the 1-worker runs "
                f"above; an addition, the headline is 1 worker): {statistics.median(two_mb):,.1f} MB/s (runs "
                f"{', '.join(f'{v:,.1f}' for v in two_mb)}); ratio to np.save: "
                f"{statistics.median(two_mb) / statistics.median(save_mb):.3f}x; peak RSS of its largest process "
                f"{max(two_rss):,.0f} MiB")
    if RAY:
        ray_mb = [raw / 1e6 / s for s in ray_s]
        print(f"npz ingest as Ray tasks: {statistics.median(ray_mb):,.1f} MB/s (runs "
              f"{', '.join(f'{v:,.1f}' for v in ray_mb)}); ratio Ray / 1 process: "
              f"{statistics.median(ray_mb) / statistics.median(lake_mb):.3f}x; peak RSS of the driver "
              f"{max(ray_rss):,.0f} MiB")

    # -- append 1% -----------------------------------------------------------------------------------------------------
    table = work / "lake0" / "npz"
    table_bytes = _bytes(table)
    _write_npz_shards(work / "append", max(1, n // 100), seed=2)
    before = {p.name for p in (table / "data").iterdir()}
    log_before = {p.name for p in (table / "_log").iterdir()}
    _ingest(work / "lake0", "npz", f"npz:{work / 'append'}", "--mode", "append")
    written = sum(_bytes(table / "data" / d) for d in {p.name for p in (table / "data").iterdir()} - before)
    written += sum((table / "_log" / f).stat().st_size for f in {p.name for p in (table / "_log").iterdir()}
                   - log_before)
    print(f"append 1% ({max(1, n // 100):,} examples): wrote {written / 1e6:,.2f} MB = "
          f"{written / table_bytes * 100:.2f}% of the table's {table_bytes / 1e6:,.1f} MB  (goal <= 5%)")
    shutil.rmtree(work / "lake0")

    # -- images: 1 vs 2 workers ----------------------------------------------------------------------------------------
    chunk = min(2048, max(64, n_images // 16))  # at least 16 chunks, so 2 workers have work to share
    variants: dict[str, tuple[str, ...]] = {"1": ("--workers", "1"), "2": ("--workers", "2")}
    if RAY:
        variants["ray"] = RAY
    times: dict[str, list[float]] = {w: [] for w in variants}
    for rep in range(args.repeats):
        for w, extra in variants.items():
            s, r = _ingest(work / f"img{w}-{rep}", "img", f"images:{work / 'images'}", *extra, "--chunk", str(chunk))
            times[w].append(s)
            shutil.rmtree(work / f"img{w}-{rep}")
    med = {w: statistics.median(v) for w, v in times.items()}
    runs = " / ".join(", ".join(f"{v:.2f}" for v in times[w]) for w in variants)
    print(f"image folder ({n_images:,} files, {image_raw / 1e6:,.1f} MB decoded, {chunk} files per chunk): "
          f"1 worker {med['1']:.2f} s, 2 workers {med['2']:.2f} s"
          + (f", Ray tasks {med['ray']:.2f} s" if RAY else "") + f" (runs {runs})")
    print(f"speed-up 2 workers / 1 worker: {med['1'] / med['2']:.2f}x  (goal >= 1.6x)")
    print(two_line)  # last, so the lines above keep their order (docs/numbers.toml compares them as a block)
    if RAY:
        print(f"speed-up Ray tasks ({RAY[-1]}) / 1 worker: {med['1'] / med['ray']:.2f}x")


if __name__ == "__main__":
    main()
