"""``lepton-jax``: one command with a subcommand per stage, each a thin shell over the library API.

    lepton-jax lake ingest --lake DIR --source digits --table digits
    lepton-jax lake ls --lake DIR
    lepton-jax train --config configs/digits_cnn.py --workdir runs/x [--config.optim.lr=3e-4 ...]
    lepton-jax eval --workdir runs/x [--split test]
    lepton-jax predict --workdir runs/x --input examples.npy [--output predictions.npy]

Errors caused by input (config, files, data) print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lepton_jax.errors import LeptonError

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    lake = sub.add_parser("lake", help="data lake: ingest and inspect tables").add_subparsers(
        dest="lake_command", required=True)
    ingest = lake.add_parser("ingest", help="read a source into a new table version")
    ingest.add_argument("--lake", required=True, help="lake directory")
    ingest.add_argument("--source", default="digits", help="'digits' or 'npz:PATH'")
    ingest.add_argument("--table", default="digits")
    ingest.add_argument("--seed", type=int, default=0, help="split seed")
    ls = lake.add_parser("ls", help="list tables and their versions")
    ls.add_argument("--lake", required=True)
    ls.add_argument("--table", default=None, help="show one table's versions in detail")

    train = sub.add_parser("train", help="train a config; extra --config.KEY=VALUE arguments override it")
    train.add_argument("--config", required=True, help="configs/<name>.py")
    train.add_argument("--workdir", required=True, help="run directory (same dir + same config resumes)")
    train.add_argument("--lake", default=None, help="lake directory (default: config.data.lake)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars or summaries")

    ev = sub.add_parser("eval", help="evaluate a run's best checkpoint on a split of its pinned lake version")
    ev.add_argument("--workdir", required=True)
    ev.add_argument("--split", default="test")
    ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: best on dev)")

    pred = sub.add_parser("predict", help="classify examples from a .npy file with a run's best checkpoint")
    pred.add_argument("--workdir", required=True)
    pred.add_argument("--input", required=True, help=".npy of raw examples, shape (N, *example_shape)")
    pred.add_argument("--output", default=None, help="write predicted classes to this .npy")
    pred.add_argument("--step", type=int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from lepton_jax.config import split_override_args

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_override_args(argv)
        args = _parser().parse_args(rest)
        if overrides and args.command != "train":
            raise LeptonError(f"--config.* overrides apply to `train` only, got {overrides}")
        return _dispatch(args, overrides)
    except LeptonError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def _dispatch(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.command == "lake":
        return _lake(args)
    if args.command == "train":
        from lepton_jax.config import load_config
        from lepton_jax.train.loop import train_and_evaluate

        config = load_config(args.config, overrides)
        train_and_evaluate(config, args.workdir, lake_root=args.lake, progress=not args.no_progress)
        return 0
    if args.command == "eval":
        return _eval(args)
    if args.command == "predict":
        return _predict(args)
    raise AssertionError(args.command)


def _lake(args: argparse.Namespace) -> int:
    from lepton_jax.lake import Lake, ingest, make_source

    lake = Lake(args.lake)
    if args.lake_command == "ingest":
        result = ingest(lake, args.table, make_source(args.source), seed=args.seed)
        tv = result.version
        counts = ", ".join(f"{s} {tv.num_examples(s)}" for s in tv.splits)
        if result.created:
            print(f"committed {lake.root}/{tv.table} version {tv.version}: {counts}; cleaning: {result.report}")
        else:
            print(f"unchanged: {lake.root}/{tv.table} version {tv.version} already holds this source ({counts})")
        return 0
    tables = [args.table] if args.table else lake.tables()
    if not tables:
        print(f"lake {lake.root} has no tables")
    for table in tables:
        for version in lake.versions(table) or [None]:
            if version is None:
                lake.table(table)  # raises the 'no such table' error
            tv = lake.table(table, version)
            counts = ", ".join(f"{s}={tv.num_examples(s)}" for s in tv.splits)
            src = tv.record["lineage"]["source"]
            print(f"{table}@{version}  {counts}  labels={len(tv.label_names)}  source={src['uri']} "
                  f"sha256={src['sha256'][:12]}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lepton_jax.eval import metrics
    from lepton_jax.lake import Lake
    from lepton_jax.serve import Predictor
    from lepton_jax.serve.predictor import read_run

    _, run_info = read_run(Path(args.workdir))
    data = run_info["data"]
    predictor = Predictor.from_workdir(args.workdir, step=args.step)
    split = Lake(data["lake"]).table(data["table"], data["version"]).reader(args.split)
    examples = split.read_all()
    labels = examples["label"]
    predictions = predictor.predict(examples["image"], name=f"{data['table']}@{data['version']}/{args.split}")
    summary = metrics.classification_summary(labels, predictions["class"], predictor.label_names)
    print(f"{data['table']}@{data['version']} split {args.split}, checkpoint step {predictor.step}:")
    print(summary["report_text"])
    print(f"accuracy {summary['accuracy']:.4f}")

    return 0


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from lepton_jax.serve import Predictor, load_npy

    raw = load_npy(args.input)
    predictor = Predictor.from_workdir(args.workdir, step=args.step)
    out = predictor.predict(raw, name=args.input)
    classes = out["class"]
    names = [predictor.label_names[c] for c in classes]
    print(f"predicted {len(classes)} example(s) with checkpoint step {predictor.step}")
    for i, (name, prob) in enumerate(zip(names[:20], out["probability"][:20], strict=False)):
        print(f"  [{i}] {name}  (p={prob.max():.3f})")
    if len(names) > 20:
        print(f"  ... {len(names) - 20} more")
    if args.output:
        _save_npy_atomic(Path(args.output), classes.astype(np.int32))
        print(f"wrote {args.output}")
    return 0


def _save_npy_atomic(path: Path, array) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npy", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
