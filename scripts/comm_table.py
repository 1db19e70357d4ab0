"""Collective bytes per train step under each sharding layout, measured on the compiled program.

    .venv/bin/python scripts/comm_table.py [--config configs/digits_resnet.py] [--devices 8] [--grad-accum 4]

For one synchronous train step of ``--config`` on ``--devices`` simulated CPU devices (set before JAX starts), prints
per layout: the payload bytes per device (operand bytes of every collective, lepton_jax.parallel.comm), the bytes a
device sends under the ring model, the number of collectives by kind, and the ratio to data parallel. The layouts:
data parallel, FSDP, the ``fsdp_tp`` preset (convolutions sharded over ``fsdp`` only) and, for comparison, the rule
``fsdp_tp`` used before (input channels over ``fsdp`` *and* output channels over ``tensor`` on every convolution).
Compiles four programs: about a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from lepton_jax.cli import run_script

ROOT = Path(__file__).resolve().parents[1]

# the fsdp_tp conv rule before convolutions became FSDP-only under fsdp_tp
CONV_OVER_TENSOR = [("mlp", "tensor"), ("heads", "tensor"), ("conv_out", "tensor"), ("embed", "fsdp"),
                    ("conv_in", "fsdp"), ("mlp", "fsdp")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "digits_resnet.py"))
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1, help="grad_accum_steps (micro-batches per step)")
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))

    import jax

    from lepton_jax.config import load_config
    from lepton_jax.parallel import rules as sharding_rules
    from lepton_jax.parallel.comm import wire_breakdown
    from lepton_jax.train.edge import dp_step_bytes

    config = load_config(args.config, [f"grad_accum_steps={args.grad_accum}"])
    sharding_rules.PRESETS.setdefault("fsdp_tp_conv_over_tensor", tuple(CONV_OVER_TENSOR))  # this run only
    n = args.devices
    layouts = [("data parallel", {"data": n}, "dp"), ("FSDP", {"fsdp": n}, "fsdp"),
               ("fsdp_tp (convs: fsdp only)", {"fsdp": n // 2, "tensor": 2}, "fsdp_tp"),
               ("fsdp_tp, convs also over tensor (before)", {"fsdp": n // 2, "tensor": 2},
                "fsdp_tp_conv_over_tensor")]
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"{config.model.name} ({args.config}), global batch {config.batch_size} in {config.grad_accum_steps} "
          f"micro-batch(es), {n} CPU devices x 1 process, "
          f"jax {jax.__version__}; sharding.min_size {config.sharding.min_size}")
    print("| layout | mesh | payload bytes/step | ring wire bytes/step | collectives | payload ÷ DP | wire ÷ DP |")
    print("|---|---|---:|---:|---|---:|---:|")
    base = None
    for name, axes, rules in layouts:
        text = dp_step_bytes(config, example_shape=(8, 8, 1), num_classes=10, axes=axes, rules=rules,
                             min_size=config.sharding.min_size, hlo=True)
        rows = wire_breakdown(text)
        payload = sum(r["payload_bytes"] for r in rows)
        wire = round(sum(r["ring_wire_bytes"] for r in rows))
        kinds = Counter(r["opcode"] for r in rows)
        base = base or (payload, wire)
        print(f"| {name} | {axes} | {payload:,} | {wire:,} | "
              f"{', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))} | {payload / base[0]:.2f}× | "
              f"{wire / base[1]:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))
