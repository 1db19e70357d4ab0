"""`lepton-jax train|eval|predict`: train a config, evaluate and use a run's checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from lepton_jax.files import atomic_write


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train", help="train a config; extra --config.KEY=VALUE arguments override it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config overrides (any number, anywhere on the command line):\n"
               "  --config.KEY=VALUE   set an existing key of the config (dotted path), e.g.\n"
               "    --config.optim.lr=3e-4 --config.num_epochs=5 --config.model.name=my_pkg.models:Tiny\n"
               "    --config.augment=\"(('random_shift', {'max_shift': 1}),)\"\n"
               "  VALUE is a Python literal of the key's type (ints widen to floats; tuples, dicts and quoted\n"
               "  strings as in Python); an unknown key or a wrong type is an error naming it. Every key and its\n"
               "  default: lepton_jax/configs/digits_cnn.py (the base config). The resolved config is saved as\n"
               "  WORKDIR/config.json.")
    train.add_argument("--config", required=True,
                       help="a packaged config's name (digits_cnn) or a file (configs/<name>.py); :ARG for a variant")
    train.add_argument("--workdir", required=True, help="run directory (same dir + same config resumes)")
    train.add_argument("--lake", default=None, help="lake directory (default: config.data.lake)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars or summaries")
    train.set_defaults(handler=train_command, accepts_overrides=True)

    launch = sub.add_parser("launch", help="run a lepton-jax command in N local processes joined over 127.0.0.1",
                            description="example: lepton-jax launch --num-processes 2 --devices-per-process 4 -- "
                                        "train --config configs/digits_cnn.py --workdir runs/mp")
    launch.add_argument("--num-processes", type=int, required=True)
    launch.add_argument("--devices-per-process", type=int, default=None,
                        help="simulated CPU devices per process (CPU development)")
    launch.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    launch.add_argument("command", nargs=argparse.REMAINDER, help="the lepton-jax command to run, after --")
    launch.set_defaults(handler=launch_command, accepts_overrides=True)

    ev = sub.add_parser("eval", help="evaluate a run's best checkpoint on a split of its pinned lake version")
    _model_source(ev)
    ev.add_argument("--split", default="test")
    ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: best on dev)")
    ev.set_defaults(handler=eval_command)

    pred = sub.add_parser("predict", help="classify examples from a .npy file with a run's best checkpoint")
    _model_source(pred)
    pred.add_argument("--input", required=True, help=".npy of raw examples, shape (N, *example_shape)")
    pred.add_argument("--output", default=None, help="write predicted classes to this .npy")
    pred.add_argument("--step", type=int, default=None)
    pred.set_defaults(handler=predict_command)


def _model_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=None, help="a run directory of `lepton-jax train`")
    parser.add_argument("--lake", default=None, help="or: the lake holding the model registry (with --model)")
    parser.add_argument("--model", default=None, help="NAME, NAME@VERSION or NAME@STAGE from the registry")


def _load_predictor(args: argparse.Namespace):
    """``(predictor, data)`` from ``--workdir`` or ``--lake/--model`` (a registry version: the lake alone)."""
    from lepton_jax.errors import LeptonError
    from lepton_jax.serve import Predictor
    from lepton_jax.serve.predictor import read_run

    if bool(args.workdir) == bool(args.model):
        raise LeptonError(f"{args.command} needs either --workdir RUN or --lake LAKE --model NAME@VERSION")
    if args.model:
        from lepton_jax.serve.registry import Registry

        if not args.lake:
            raise LeptonError("--model needs --lake (the lake holding the registry)")
        if args.step is not None:
            raise LeptonError("--step applies to --workdir; a registry version has one checkpoint")
        entry = Registry(args.lake).resolve(args.model)
        return Predictor.from_registry(entry), entry.record["data"]
    return Predictor.from_workdir(args.workdir, step=args.step), read_run(Path(args.workdir))[1]["data"]


def train_command(args: argparse.Namespace) -> int:
    """SIGTERM/SIGINT at any moment end the run with at most one line: in the loop, saved at the step (exit 0 for
    SIGTERM, 130 for SIGINT); before training starts, 143/130; during the final report, 0/130 (a rerun writes it)."""
    import sys

    from lepton_jax.signals import Interrupted, raise_on_signals

    try:
        with raise_on_signals():  # from before the heavy imports: start-up, restore, compile, the report
            from lepton_jax.config import load_config
            from lepton_jax.parallel.distributed import initialize
            from lepton_jax.train.loop import train
            from lepton_jax.train.validate import validate_config

            config = load_config(args.config, args.overrides)
            validate_config(config)  # before joining a job or touching devices: one line, exit 2
            initialize()
            out = train(config, args.workdir, lake_root=args.lake, progress=not args.no_progress)  # picks the strategy
    except Interrupted as e:
        where = (f"training is saved at step {e.saved_step}; rerun the same command to write the final report"
                 if e.saved_step is not None else "before training started: nothing new to save; rerun the same "
                 "command to start (or resume)")
        print(f"lepton_jax: {e.name}: {where}", file=sys.stderr, flush=True)
        return e.exit_code
    return 130 if out.get("signal") == "SIGINT" else 0


def launch_command(args: argparse.Namespace) -> int:
    from lepton_jax.errors import LeptonError
    from lepton_jax.parallel.distributed import launch

    command = [a for a in args.command if a != "--"] + [f"--config.{o}" for o in args.overrides]
    if not command:
        raise LeptonError("launch needs a command after --, e.g. -- train --config configs/digits_cnn.py ...")
    if args.num_processes < 1:
        raise LeptonError(f"--num-processes must be >= 1, got {args.num_processes}")
    return launch(command, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                  port=args.port)


def eval_command(args: argparse.Namespace) -> int:
    from lepton_jax.data.transforms import LABEL, input_array, prepare_batch
    from lepton_jax.eval import metrics
    from lepton_jax.lake import Lake
    from lepton_jax.tasks import Classification

    predictor, data = _load_predictor(args)
    split = Lake(data["lake"]).table(data["table"], data["version"]).reader(args.split)
    examples = split.read_all()
    labels = examples["label"]
    name = f"{data['table']}@{data['version']}/{args.split}"
    print(f"{data['table']}@{data['version']} split {args.split}, checkpoint step {predictor.step}:")
    if not isinstance(predictor.task, Classification):
        outputs = predictor.logits(examples[input_array(predictor.schema)], name=name)
        report = predictor.task.report(outputs, prepare_batch(examples, predictor.schema)[LABEL])
        print(report["text"])
        print(report["headline"])
        return 0
    predictions = predictor.predict(examples[input_array(predictor.schema)], name=name)
    summary = metrics.classification_summary(labels, predictions["class"], predictor.label_names)
    print(summary["report_text"])
    print(f"accuracy {summary['accuracy']:.4f}")
    return 0


def predict_command(args: argparse.Namespace) -> int:
    import numpy as np

    from lepton_jax.serve import load_npy

    raw = load_npy(args.input)
    predictor, _ = _load_predictor(args)
    out = predictor.predict(raw, name=args.input)
    if "class" not in out:  # regression and plug-in tasks: their named outputs; --output saves the first
        key = next(iter(out))
        values = np.asarray(out[key])
        print(f"predicted {values.shape[0]} example(s) with checkpoint step {predictor.step} ({key})")
        for i, row in enumerate(values[:20]):
            print(f"  [{i}] {np.array2string(np.atleast_1d(row), precision=4)}")
        if values.shape[0] > 20:
            print(f"  ... {values.shape[0] - 20} more")
        if args.output:
            with atomic_write(args.output, "wb") as f:
                np.save(f, values)
            print(f"wrote {args.output}")
        return 0
    classes = out["class"]
    names = [predictor.label_names[c] for c in classes]
    print(f"predicted {len(classes)} example(s) with checkpoint step {predictor.step}")
    for i, (name, prob) in enumerate(zip(names[:20], out["probability"][:20], strict=False)):
        print(f"  [{i}] {name}  (p={prob.max():.3f})")
    if len(names) > 20:
        print(f"  ... {len(names) - 20} more")
    if args.output:
        with atomic_write(args.output, "wb") as f:
            np.save(f, classes.astype(np.int32))
        print(f"wrote {args.output}")
    return 0

