"""Tabular tables against a linear baseline: our MLP configs beside scikit-learn's LogisticRegression.

For each of scikit-learn's ``wine`` and ``breast_cancer`` tables: ingest it into a lake (per-column ranges recorded
in the schema), train ``configs/<table>_mlp.py`` with the library, then fit ``LogisticRegression`` on the same lake
split, standardised with ``StandardScaler`` fitted on the train split, and print both test accuracies.

Command:   .venv/bin/python scripts/tabular_baselines.py [--tables wine breast_cancer] [--seed N] [--workdir DIR]
           [--out FILE] [--check]
Runtime:   about a minute per table on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from lepton_jax.cli import run_script

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", default=["wine", "breast_cancer"],
                        choices=["iris", "wine", "breast_cancer"])
    parser.add_argument("--workdir", default=None, help="lake and runs go here (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this file")
    parser.add_argument("--seed", type=int, default=None, help="override the configs' seed (default: theirs)")
    parser.add_argument("--check", action="store_true", help="exit 1 when an MLP is below its LogisticRegression")
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from lepton_jax.config import load_config
    from lepton_jax.data.transforms import input_array
    from lepton_jax.lake import Lake
    from lepton_jax.lake.ingest import ingest
    from lepton_jax.lake.sources import SklearnSource
    from lepton_jax.train.loop import train

    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    from lepton_jax.runs import layout

    print(f"layout: {layout(jax.process_count(), jax.device_count())}, backend {jax.default_backend()}")
    with tempfile.TemporaryDirectory(prefix="tabular-") as tmp:
        work = Path(args.workdir or tmp)
        lake = Lake(work / "lake")
        rows = []
        for table in args.tables:
            version = ingest(lake, table, SklearnSource(table)).version
            config = load_config(ROOT / "configs" / f"{table}_mlp.py",
                                 [] if args.seed is None else [f"seed={args.seed}"])
            start = time.perf_counter()
            summary = train(config, work / "runs" / table, lake_root=lake.root, progress=False)
            seconds = time.perf_counter() - start
            name = input_array(version.schema)
            train_split = version.reader("train").read_all()
            test_split = version.reader("test").read_all()
            x_train = train_split[name].reshape(len(train_split["label"]), -1)
            x_test = test_split[name].reshape(len(test_split["label"]), -1)
            scaler = StandardScaler().fit(x_train)
            logreg = LogisticRegression(max_iter=5000).fit(scaler.transform(x_train), train_split["label"])
            baseline = float(np.mean(logreg.predict(scaler.transform(x_test)) == test_split["label"]))
            ours = float(summary["test_accuracy"])
            rows.append((table, version.version, len(test_split["label"]), ours, baseline, seconds))
    print(f"{'table':<14} {'test rows':>9} {'MLP (ours)':>10} {'LogReg':>8} {'MLP >= LogReg':>13} {'train s':>8}")
    for table, v, n, ours, baseline, seconds in rows:
        print(f"{table + '@' + str(v):<14} {n:>9} {ours:>10.4f} {baseline:>8.4f} {str(ours >= baseline):>13} "
              f"{seconds:>8.1f}")
    if args.out:
        results = {table: {"version": v, "test_rows": n, "mlp_test_accuracy": ours, "logreg_test_accuracy": baseline,
                           "train_seconds": seconds} for table, v, n, ours, baseline, seconds in rows}
        results["layout"] = {"devices": jax.device_count(), "processes": jax.process_count()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 1 if args.check and any(ours < baseline for *_, ours, baseline, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
