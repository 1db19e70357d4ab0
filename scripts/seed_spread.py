"""Test accuracy of a config over several seeds (mean, min, max), so a single run's figure can be put in context.

    .venv/bin/python scripts/seed_spread.py --config configs/digits_cnn.py --seeds 0 1 2 --lake lake
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np

from lepton_jax.cli import run_script
from lepton_jax.config import load_config
from lepton_jax.lake import DigitsSource, Lake, ingest
from lepton_jax.train.loop import train_and_evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits_cnn.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lake", default="lake", help="a lake holding the config's table (created, with the "
                        "embedded digits table, when it holds no digits table: default 'lake')")
    args = parser.parse_args()
    configs = [load_config(args.config, [f"seed={seed}", f"data.lake={args.lake}"]) for seed in args.seeds]
    lake = Lake(args.lake)
    if configs[0].data.table == "digits":
        ingest(lake, "digits", DigitsSource())  # no-op when the lake already holds the digits
    lake.table(configs[0].data.table)  # a missing table is one error line before any training
    rows = []
    for seed, config in zip(args.seeds, configs, strict=True):
        with tempfile.TemporaryDirectory() as workdir:
            result = train_and_evaluate(config, workdir, progress=False)
        rows.append((seed, result["best_dev_accuracy"], result["test_accuracy"], result["train_seconds"]))
        print(f"seed {seed}: best dev accuracy {rows[-1][1]:.4f}  test accuracy {rows[-1][2]:.4f}  "
              f"train {rows[-1][3]:.1f}s", flush=True)
    test = np.array([r[2] for r in rows])
    print(f"{args.config} over seeds {args.seeds}: test accuracy mean {test.mean():.4f} "
          f"min {test.min():.4f} max {test.max():.4f}")


if __name__ == "__main__":
    sys.exit(run_script(main))
