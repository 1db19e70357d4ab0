"""`lepton-jax lake ...`: ingest and inspect lake tables."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    lake = sub.add_parser("lake", help="data lake: ingest and inspect tables").add_subparsers(
        dest="lake_command", required=True)
    ingest = lake.add_parser("ingest", help="read a source into a new table version")
    ingest.add_argument("--lake", required=True, help="lake directory")
    ingest.add_argument("--source", default="digits", help="'digits' or 'npz:PATH'")
    ingest.add_argument("--table", default="digits")
    ingest.add_argument("--seed", type=int, default=0, help="split seed")
    ingest.set_defaults(handler=ingest_command)
    ls = lake.add_parser("ls", help="list tables and their versions")
    ls.add_argument("--lake", required=True)
    ls.add_argument("--table", default=None, help="show one table's versions in detail")
    ls.set_defaults(handler=ls_command)


def ingest_command(args: argparse.Namespace) -> int:
    from lepton_jax.lake import Lake, ingest, make_source

    lake = Lake(args.lake)
    result = ingest(lake, args.table, make_source(args.source), seed=args.seed)
    tv = result.version
    counts = ", ".join(f"{s} {tv.num_examples(s)}" for s in tv.splits)
    if result.created:
        print(f"committed {lake.root}/{tv.table} version {tv.version}: {counts}; cleaning: {result.report}")
    else:
        print(f"unchanged: {lake.root}/{tv.table} version {tv.version} already holds this source ({counts})")
    return 0


def ls_command(args: argparse.Namespace) -> int:
    from lepton_jax.lake import Lake

    lake = Lake(args.lake)
    tables = [args.table] if args.table else lake.tables()
    if not tables:
        print(f"lake {lake.root} has no tables")
    for table in tables:
        for version in lake.versions(table) or [None]:
            tv = lake.table(table, version)  # version None on an unknown table raises the 'no such table' error
            counts = ", ".join(f"{s}={tv.num_examples(s)}" for s in tv.splits)
            src = tv.record["lineage"]["source"]
            print(f"{table}@{tv.version}  {counts}  labels={len(tv.label_names)}  source={src['uri']} "
                  f"sha256={src['sha256'][:12]}")
    return 0
