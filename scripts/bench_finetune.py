"""Fine-tuning from the registry vs training from scratch, on an appended table version.

In a fresh lake: ingest digits (v1), train configs/digits_cnn.py on it, register and promote it to production; append
the same digits shifted (--shift invert: 16 - x; brightness: min(x + 6, 16)) with ``mode="append"`` (v2: both).
Then, on v2:

  * from scratch: configs/digits_cnn.py (random init); its final dev accuracy is the target and its step count the
    baseline;
  * fine-tuned: configs/digits_finetune.py (init from digits@production, lr 1e-3, no warm-up) with the same number of
    epochs (--ft-epochs), dev accuracy every --eval-every steps, stopped at the first evaluation that reaches the
    target.

Prints steps_finetune / steps_scratch (goal <= 0.25), with the command, the machine and devices x processes.

    .venv/bin/python scripts/bench_finetune.py                      # inverted digits; 3-5 minutes on a 2-core CPU
    .venv/bin/python scripts/bench_finetune.py --shift brightness   # a milder shift
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from lepton_jax.config import load_config
from lepton_jax.lake import DigitsSource, Lake, ingest
from lepton_jax.serve.registry import Registry
from lepton_jax.tracking import machine
from lepton_jax.train.hooks import Hook
from lepton_jax.train.loop import train_and_evaluate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


SHIFTS = {"invert": lambda x: 16 - x, "brightness": lambda x: np.minimum(x + 6, 16)}


class ShiftedDigits(DigitsSource):
    """scikit-learn's digits with a distribution shift: inverted intensity (16 - x) or a brightness shift
    (min(x + 6, 16)); the new data the table gains."""

    def __init__(self, shift: str):
        super().__init__()
        self.shift = shift
        self.name, self.uri = f"digits-{shift}", f"sklearn://datasets/load_digits?shift={shift}"

    def load(self):
        data = super().load()
        data.arrays["image"] = SHIFTS[self.shift](data.arrays["image"].astype(np.int64)).astype(np.uint8)
        return data


def stop_at(target: float, every: int, reached: dict) -> Hook:
    """Ends training at the first dev evaluation (every ``every`` steps, run just before this hook) >= ``target``."""

    def fn(ctx):
        accuracy = ctx.metrics.get("dev_accuracy")
        if accuracy is not None and accuracy >= target and "step" not in reached:
            reached.update(step=ctx.step, dev_accuracy=accuracy)
            ctx.stop_reason = "reached the from-scratch dev accuracy"

    return Hook(fn, every, at_end=False, name="stop_at_target")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shift", choices=sorted(SHIFTS), default="invert", help="the appended data's shift")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the production and from-scratch runs")
    parser.add_argument("--ft-epochs", type=int, default=None,
                        help="the fine-tuned run's epochs (its schedule's length; default: --epochs); it stops early")
    parser.add_argument("--ft-lr", type=float, default=None, help="fine-tuned run's optim.lr (default: the config's)")
    parser.add_argument("--eval-every", type=int, default=10, help="fine-tuned run: dev evaluation every N steps")
    parser.add_argument("--workdir", default=None, help="keep the lake and runs here (default: a temp dir)")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        lake = root / "lake"
        ingest(Lake(lake), "digits", DigitsSource())
        scratch = load_config(CONFIGS / "digits_cnn.py", [f"num_epochs={args.epochs}"])
        train_and_evaluate(scratch, root / "production", lake_root=lake, progress=False)
        registry = Registry(lake)
        entry = registry.register("digits", root / "production")
        registry.promote("digits", entry.version, "production")
        version = ingest(Lake(lake), "digits", ShiftedDigits(args.shift), mode="append").version.version
        print(f"table digits v{version}: digits + digits with shift {args.shift!r} appended; production = "
              f"{entry.ref}")

        base = train_and_evaluate(scratch, root / "scratch", lake_root=lake, progress=False)
        target, steps_scratch = base["history"]["dev_accuracy"][-1], base["steps"]
        print(f"from scratch on v{version}: {steps_scratch} steps, final dev accuracy {target:.4f}, "
              f"test accuracy {base['test_accuracy']:.4f}")

        finetune = load_config(CONFIGS / "digits_finetune.py", [f"num_epochs={args.ft_epochs or args.epochs}",
                                                                f"eval_every_steps={args.eval_every}"]
                               + ([f"optim.lr={args.ft_lr}"] if args.ft_lr else []))
        reached: dict = {}
        tuned = train_and_evaluate(finetune, root / "finetune", lake_root=lake, progress=False,
                                   hooks=[stop_at(target, args.eval_every, reached)])
        accuracies = tuned["history"]["dev_accuracy"]
        print(f"fine-tuned from digits@production ({entry.ref}) on v{version}: dev accuracy "
              f"{accuracies[0]:.4f} after {args.eval_every} steps; "
              + (f"reached {reached['dev_accuracy']:.4f} >= {target:.4f} at step {reached['step']}"
                 if reached else f"did not reach {target:.4f} in {tuned['steps']} steps (best "
                                 f"{max(accuracies):.4f})")
              + f"; test accuracy {tuned['test_accuracy']:.4f}; lineage parent "
                f"{tuned['lineage']['parent']['model']} (table {tuned['lineage']['parent']['data']['table']} "
                f"v{tuned['lineage']['parent']['data']['version']}) -> table {tuned['lineage']['data']['table']} "
                f"v{tuned['lineage']['data']['version']}")
    ratio = reached["step"] / steps_scratch if reached else None
    print(f"\ncommand: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()['label']}; {jax.device_count()} {jax.devices()[0].platform} device(s) x "
          f"{jax.process_count()} process(es); {time.perf_counter() - start:.0f} s in all")
    print(f"steps to the from-scratch final dev accuracy: fine-tuned {reached.get('step', 'not reached')} / "
          f"from scratch {steps_scratch} = " + (f"{ratio:.3f} (goal <= 0.25)" if ratio is not None else "n/a"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
