"""`lepton-jax runs ls|compare` and `lepton-jax sweep`: the research workflow across runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    runs_parser = sub.add_parser("runs", help="list and compare run directories").add_subparsers(
        dest="runs_command", required=True)
    ls = runs_parser.add_parser("ls", help="a table of every run under a directory")
    ls.add_argument("root", help="directory holding run directories")
    ls.set_defaults(handler=ls_command)
    compare = runs_parser.add_parser("compare", help="config differences and results of runs; optional curves")
    compare.add_argument("workdirs", nargs="+")
    compare.add_argument("--plot", default=None, help="write learning curves to this PNG")
    compare.set_defaults(handler=compare_command)

    sweep = sub.add_parser("sweep", help="run a config's get_sweep() points, each in its own workdir")
    sweep.add_argument("--config", required=True, help="a packaged config's name or a config file")
    sweep.add_argument("--workdir", required=True, help="parent directory of the sweep's runs")
    sweep.add_argument("--lake", default=None)
    sweep.add_argument("--processes", type=int, default=1, help="run N points at once in local processes")
    sweep.add_argument("--no-progress", action="store_true")
    sweep.set_defaults(handler=sweep_command, accepts_overrides=True)


def ls_command(args: argparse.Namespace) -> int:
    from lepton_jax import runs

    summaries = [runs.run_summary(p) for p in runs.find_runs(args.root)]
    if not summaries:
        print(f"no runs under {args.root}")
        return 0
    print(runs.table(summaries, runs.config_differences(summaries)))
    return 0


def compare_command(args: argparse.Namespace) -> int:
    from lepton_jax import runs
    from lepton_jax.errors import LeptonError

    dirs = [Path(w) for w in args.workdirs]
    for d in dirs:
        if not (d / "config.json").exists():
            raise LeptonError(f"{d} is not a run directory (no config.json)")
    summaries = [runs.run_summary(d) for d in dirs]
    diff = runs.config_differences(summaries)
    print(f"config differences: {', '.join(diff) if diff else 'none'}")
    print(runs.table(summaries, diff))
    if args.plot:
        runs.plot_curves(dirs, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    from lepton_jax.parallel.distributed import initialize
    from lepton_jax.sweep import run_sweep

    if args.processes <= 1:
        initialize()
    print(run_sweep(args.config, args.workdir, lake_root=args.lake, processes=args.processes,
                    extra_overrides=args.overrides, progress=not args.no_progress))
    print(f"wrote {args.workdir}/summary.md and summary.json")
    return 0
