"""CPU time to place one host batch on the devices: ``lepton_jax.data.to_global`` against
``jax.device_put(batch, sharding)``, the call it replaced, and the jitted identity with the batch sharding that
``to_global`` uses on one CPU device, on the training loop's batch (the digits CNN's: 64 x 8 x 8 x 1 float32 inputs
+ int32 labels) or any ``--batch``/``--shape``; on several devices ``to_global`` is ``device_put``, and the identity's
line shows why.

Prints process CPU microseconds per batch of each side, interleaved repeats, medians with the spread, the ratio
device_put / to_global, and checks that all give the same arrays with the same sharding.

    .venv/bin/python scripts/bench_place.py
    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python scripts/bench_place.py   # 8-way sharded
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lepton_jax.data import to_global
from lepton_jax.data.pipeline import _placer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shape", type=int, nargs="+", default=[8, 8, 1], help="shape of one input example")
    parser.add_argument("--calls", type=int, default=2000, help="placements per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print("load average (1, 5, 15 min) at start: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
          + f" on {os.cpu_count()} CPUs; {platform.processor() or platform.machine()}")
    devices = jax.devices()
    if args.batch % len(devices):
        raise SystemExit(f"--batch {args.batch} must be divisible by the {len(devices)} devices")
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
    rng = np.random.default_rng(0)
    batch = {"input": rng.uniform(size=(args.batch, *args.shape)).astype(np.float32),
             "label": rng.integers(0, 10, args.batch).astype(np.int32)}
    identity = _placer(sharding)
    sides = {"to_global": lambda: to_global(batch, sharding), "device_put": lambda: jax.device_put(batch, sharding),
             "identity": lambda: identity(batch)}
    placed = {name: jax.block_until_ready(fn()) for name, fn in sides.items()}  # compiled and warm
    for key in batch:
        b = placed["device_put"][key]
        for name in ("to_global", "identity"):
            a = placed[name][key]
            if not (np.array_equal(np.asarray(a), np.asarray(b)) and a.sharding == b.sharding):
                raise SystemExit(f"{name} and device_put disagree on {key!r}")
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            start = time.process_time()
            for _ in range(args.calls):
                out = fn()
            jax.block_until_ready(out)
            cpu[name].append(1e6 * (time.process_time() - start) / args.calls)
    print(f"jax {jax.__version__}, {len(devices)} {devices[0].platform} device(s); batch {args.batch} x "
          f"{tuple(args.shape)} float32 + int32 labels; {args.calls} placements x {args.repeats} interleaved repeats")
    for name, values in cpu.items():
        print(f"  {name:>10}: process CPU {np.median(values):7.1f} us per batch (min {min(values):.1f}, "
              f"max {max(values):.1f})")
    ratios = [a / b for a, b in zip(cpu["device_put"], cpu["to_global"], strict=True)]
    print(f"device_put / to_global CPU per batch: median {np.median(ratios):.2f}x (min {min(ratios):.2f}, "
          f"max {max(ratios):.2f}); same arrays and sharding: yes")


if __name__ == "__main__":
    main()
