"""``lepton-jax``: one command with a subcommand per stage, each a thin shell over the library API.

    lepton-jax lake ingest --lake DIR --source digits --table digits
    lepton-jax lake ls --lake DIR
    lepton-jax train --config configs/digits_cnn.py --workdir runs/x [--config.optim.lr=3e-4 ...]
    lepton-jax eval --workdir runs/x [--split test]
    lepton-jax predict --workdir runs/x --input examples.npy [--output predictions.npy]
    python -m lepton_jax ...         (the same command, e.g. in a notebook: !python -m lepton_jax --version)

Stages register their subcommands from ``lepton_jax.commands.<stage>``. Errors caused by input (config, files,
data) print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from lepton_jax import __version__
from lepton_jax.commands import lake, research, robust, serve, train
from lepton_jax.errors import LeptonError

EXIT_USER_ERROR = 2
STAGES = (lake, train, serve, robust, research)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton-jax", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"lepton-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        stage.register(sub)
    return parser


def _import_from_working_directory() -> None:
    """``python -m lepton_jax`` puts the working directory first on ``sys.path``; the installed ``lepton-jax``
    script does not. Append it (last: it never shadows an installed package), so both find a plug-in module there."""
    cwd = os.getcwd()
    if not any(p in ("", cwd) for p in sys.path):
        sys.path.append(cwd)


def run_script(main: Callable[[], int | None]) -> int:
    """Runs a script's ``main()`` as the CLI runs a command: an error caused by input (a :class:`LeptonError`:
    config, lake, files) is one ``error:`` line on stderr and exit status 2, not a traceback."""
    try:
        return int(main() or 0)
    except LeptonError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    from lepton_jax.config import split_override_args

    if argv is None:  # run as a program: plug-ins (``my_pkg.models:Tiny``) also import from the working directory
        _import_from_working_directory()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_override_args(argv)
        args = build_parser().parse_args(rest)
        if overrides and not getattr(args, "accepts_overrides", False):
            raise LeptonError(f"--config.* overrides apply to `train` only, got {overrides}")
        args.overrides = overrides
        return args.handler(args)
    except LeptonError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
