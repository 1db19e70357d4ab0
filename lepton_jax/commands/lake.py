"""`lepton-jax lake ...`: ingest (overwrite or append), list, inspect, compact, verify and garbage-collect tables."""

from __future__ import annotations

import argparse
import json
import time

COMPRESSION_HELP = ("layout of the new fragments' inner chunks: none (raw ~64 KiB chunks: fastest to write, and to "
                    "read at random from a local disk) or zstd (one compressed example per chunk: smaller, and a "
                    "random read from an object store fetches one example); default: none on a local disk, zstd on "
                    "S3/GCS (docs/lake.md)")


def register(sub: argparse._SubParsersAction) -> None:
    lake = sub.add_parser("lake", help="data lake: ingest, inspect, verify and clean up tables").add_subparsers(
        dest="lake_command", required=True)
    ingest = lake.add_parser("ingest", help="read a source into a new table version")
    ingest.add_argument("--lake", required=True, help="lake root: a directory, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    ingest.add_argument("--source", default="digits",
                        help="'digits', 'sklearn:NAME', 'npz:PATH', 'images:DIR' (DIR/<label>/<image>) or 'csv:PATH'")
    ingest.add_argument("--table", default="digits")
    ingest.add_argument("--seed", type=int, default=0, help="split seed")
    ingest.add_argument("--splits", default=None, metavar="NAME=FRACTION,...",
                        help="split fractions (default train=0.7,dev=0.15,test=0.15)")
    ingest.add_argument("--resize", default=None, metavar="WxH", help="images: resize every image to W x H")
    ingest.add_argument("--mode", action="append", default=[], choices=["overwrite", "append", "L", "RGB"],
                        help="overwrite (default: the version holds exactly this source) or append (add this "
                             "source's new examples as new fragments, sharing the rest); images: grey (L, default) "
                             "or RGB. May be given twice, e.g. --mode append --mode RGB")
    ingest.add_argument("--bits", type=int, default=None, choices=[8, 16],
                        help="images: 8 (default; deeper images are quarantined, never clipped) or 16 (uint16)")
    ingest.add_argument("--workers", type=int, default=None,
                        help="processes that decode and write chunks (one commit; default 1); with --executor ray: "
                             "chunk tasks in flight (default twice the cluster's CPUs)")
    ingest.add_argument("--row-hash", default=None, choices=["xxh3_128", "sha256"],  # fragments.ROW_HASHES
                        help="the rows' identity hash for dedup and leak checks: a new table's default is xxh3_128 "
                             "(fast, not cryptographic); sha256 for untrusted sources, where rows crafted to collide "
                             "could hide an example; an existing table keeps its own")
    ingest.add_argument("--executor", default="process", choices=["process", "ray"],
                        help="process (default: --workers processes on this machine) or ray (one Ray task per "
                             "chunk, on the cluster at --ray-address, else a local Ray instance)")
    ingest.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="with --executor ray: the cluster to join (HOST:PORT or 'auto'; default RAY_ADDRESS, "
                             "else a local instance on 127.0.0.1 that is stopped afterwards)")
    ingest.add_argument("--chunk", type=int, default=None,
                        help="images: files per chunk (default 2048); csv: windows per chunk (default 65536)")
    ingest.add_argument("--label-names", default=None, metavar="NAME,...",
                        help="the label domain; examples with other labels are quarantined")
    ingest.add_argument("--per-column", action="store_true",
                        help="npz: 2-D tabular features get one range per column (scaled and checked per column)")
    ingest.add_argument("--window", type=int, default=None, help="csv: rows per example")
    ingest.add_argument("--stride", type=int, default=None, help="csv: rows between window starts (default: window)")
    ingest.add_argument("--label-column", default=None, help="csv: the label column (default: label)")
    ingest.add_argument("--series-column", default=None, help="csv: windows never cross a change of this column")
    ingest.add_argument("--target-column", "--target-columns", dest="target_columns", default=None,
                        metavar="NAME,...", help="csv: numeric column(s) that form each window's float target "
                        "vector (not features; for the regression or multilabel task)")
    ingest.add_argument("--target-reduce", default=None, choices=["mean", "last"],
                        help="csv: a window's target is its rows' mean (default) or its last row's value")
    ingest.add_argument("--feature-key", default=None, help="npz: the input array's key (default x)")
    ingest.add_argument("--label-key", default=None, help="npz: the integer label array's key (default y)")
    ingest.add_argument("--target-key", default=None,
                        help="npz: a target array's key: float (N, T) or (N,) values, multi-hot (N, K), or a class "
                             "map shaped like the input; stored as 'target' (for regression, multilabel, dense)")
    ingest.add_argument("--label-map", default=None, metavar="SRC=DST,...",
                        help="relabel: source label name -> label name; unmapped examples are quarantined")
    ingest.add_argument("--retries", type=int, default=3,
                        help="when another writer commits first, re-check and commit on top this many times")
    ingest.add_argument("--allow-schema-change", action="store_true",
                        help="allow dtypes or example shapes to differ from the latest version")
    ingest.add_argument("--compression", default=None, choices=["none", "zstd"], help=COMPRESSION_HELP)
    ingest.set_defaults(handler=ingest_command)
    compact = lake.add_parser("compact", help="merge a table's fragments into a new version with identical content")
    compact.add_argument("--lake", required=True)
    compact.add_argument("--table", required=True)
    compact.add_argument("--target-fragment-mib", type=float, default=1024.0,
                         help="raw size of each merged fragment (default 1024)")
    compact.add_argument("--compression", default=None, choices=["none", "zstd"],
                         help=COMPRESSION_HELP + "; given explicitly, a split whose one fragment is in the other "
                                                 "layout is rewritten too")
    compact.set_defaults(handler=compact_command)
    ls = lake.add_parser("ls", help="list tables and their versions")
    ls.add_argument("--lake", required=True)
    ls.add_argument("--table", default=None, help="show one table's versions in detail")
    ls.set_defaults(handler=ls_command)
    log = lake.add_parser("log", help="a table's commit history, newest first")
    log.add_argument("--lake", required=True)
    log.add_argument("--table", required=True)
    log.set_defaults(handler=log_command)
    show = lake.add_parser("show", help="one version: schema, lineage, statistics, quarantine")
    show.add_argument("--lake", required=True)
    show.add_argument("--table", required=True)
    show.add_argument("--version", type=int, default=None, help="default: latest")
    show.add_argument("--json", action="store_true", help="print the whole commit record as JSON")
    show.set_defaults(handler=show_command)
    verify = lake.add_parser("verify", help="re-check every shard and content digest; exit 2 if any is bad")
    verify.add_argument("--lake", required=True)
    verify.add_argument("--table", default=None, help="default: every table")
    verify.add_argument("--version", type=int, default=None, help="default: every version")
    verify.add_argument("--files-only", action="store_true", help="check file digests only, skip decoding arrays")
    verify.set_defaults(handler=verify_command)
    gc = lake.add_parser("gc", help="remove data no version references (crashed or lost commits), after a grace "
                                    "period")
    gc.add_argument("--lake", required=True)
    gc.add_argument("--table", default=None, help="default: every table")
    gc.add_argument("--grace-seconds", type=float, default=3600.0,
                    help="keep unreferenced files younger than this; default 3600, at least 60 without --force "
                         "(live writers' leases are honoured either way)")
    gc.add_argument("--force", action="store_true", help="allow a grace period below the 60 s minimum (even 0)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed")
    gc.set_defaults(handler=gc_command)


def _parse_size(text: str | None) -> tuple[int, int] | None:
    from lepton_jax.errors import LakeError

    if text is None:
        return None
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise LakeError(f"--resize takes WIDTHxHEIGHT, e.g. 28x28, got {text!r}") from None
    if w < 1 or h < 1:
        raise LakeError(f"--resize needs positive sizes, got {text!r}")
    return w, h


def _parse_splits(text: str | None) -> dict[str, float] | None:
    from lepton_jax.errors import LakeError

    if text is None:
        return None
    try:
        return {name: float(frac) for name, frac in (p.split("=") for p in text.split(","))}
    except ValueError:
        raise LakeError(f"--splits takes NAME=FRACTION pairs separated by commas, got {text!r}") from None


def _parse_label_map(text: str | None) -> dict[str, str] | None:
    from lepton_jax.errors import LakeError

    if text is None:
        return None
    pairs = [p.split("=") for p in text.split(",") if p]
    if not pairs or any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise LakeError(f"--label-map takes SRC=DST pairs separated by commas, got {text!r}")
    return dict(pairs)


def _parse_modes(modes: list[str]) -> tuple[str, str | None]:
    from lepton_jax.errors import LakeError

    write = [m for m in modes if m in ("overwrite", "append")]
    image = [m for m in modes if m in ("L", "RGB")]
    if len(write) > 1 or len(image) > 1:
        raise LakeError(f"--mode takes at most one of overwrite/append and one of L/RGB, got {modes}")
    return (write[0] if write else "overwrite"), (image[0] if image else None)


def ingest_command(args: argparse.Namespace) -> int:
    from lepton_jax.errors import LakeError
    from lepton_jax.lake import Lake, ingest, make_source

    lake = Lake(args.lake, compression=args.compression)
    write_mode, image_mode = _parse_modes(args.mode)
    if args.chunk is not None and args.chunk < 1:
        raise LakeError(f"--chunk must be at least 1, got {args.chunk}")
    kind = args.source.partition(":")[0]
    chunk = {"images": {"chunk_files": args.chunk}, "csv": {"chunk_windows": args.chunk}}.get(kind, {})
    if args.chunk is not None and not chunk:
        raise LakeError(f"--chunk applies to images: and csv: sources (npz sources chunk by shard file), not {kind}")
    source = make_source(args.source, size=_parse_size(args.resize), mode=image_mode, bits=args.bits,
                         window=args.window, stride=args.stride, label_column=args.label_column,
                         series_column=args.series_column, per_column=args.per_column or None,
                         target_columns=args.target_columns, target_reduce=args.target_reduce,
                         feature_key=args.feature_key, label_key=args.label_key, target_key=args.target_key, **chunk)
    if args.workers is not None and args.workers < 1:
        raise LakeError(f"--workers must be at least 1, got {args.workers}")
    label_names = [n for n in args.label_names.split(",") if n] if args.label_names else None
    result = ingest(lake, args.table, source, splits=_parse_splits(args.splits), seed=args.seed,
                    label_map=_parse_label_map(args.label_map), label_names=label_names, retries=args.retries,
                    allow_schema_change=args.allow_schema_change, mode=write_mode, workers=args.workers,
                    executor=args.executor, ray_address=args.ray_address, progress=True, row_hash=args.row_hash)
    tv = result.version
    if result.ran_on:
        tasks = result.ran_on["tasks"]
        print(f"ran {len(tasks)} chunk task(s) on the Ray cluster at {result.ran_on['address']}: "
              f"{len({t['node'] for t in tasks})} node(s), {len({(t['node'], t['pid']) for t in tasks})} worker "
              f"process(es), at most {result.ran_on['in_flight']} in flight")
    counts = ", ".join(f"{s} {tv.num_examples(s)}" for s in tv.splits)
    if result.created:
        frags = sum(len(tv.fragments(s)) for s in tv.splits)
        print(f"committed {lake.root}/{tv.table} version {tv.version} ({tv.record['lineage'].get('mode')}, "
              f"{frags} fragment(s)): {counts}; cleaning: {result.report}")
        quarantined = tv.quarantine()
        if quarantined:
            print(f"quarantined {len(quarantined)} example(s); see `lepton-jax lake show --lake {lake.root} "
                  f"--table {tv.table} --version {tv.version}`")
    else:
        print(f"unchanged: {lake.root}/{tv.table} version {tv.version} already holds this source ({counts})")
    return 0


def compact_command(args: argparse.Namespace) -> int:
    from lepton_jax.errors import LakeError
    from lepton_jax.lake import Lake

    if not args.target_fragment_mib > 0:
        raise LakeError(f"--target-fragment-mib must be positive, got {args.target_fragment_mib}")
    lake = Lake(args.lake, compression=args.compression)
    old = lake.table(args.table)
    new = lake.compact(args.table, target_fragment_bytes=int(args.target_fragment_mib * 2**20),
                       relayout=args.compression is not None)
    before = {s: len(old.fragments(s)) for s in old.splits}
    if new.version == old.version:
        layout = f", all in the {lake.compression} layout" if args.compression is not None else ""
        print(f"nothing to compact: {args.table}@{old.version} has fragments {before}{layout}")
        return 0
    after = {s: len(new.fragments(s)) for s in new.splits}
    print(f"compacted {args.table}@{old.version} -> version {new.version}: fragments {before} -> {after}; "
          "logical content digests unchanged")
    return 0


def ls_command(args: argparse.Namespace) -> int:
    from lepton_jax.errors import LakeError
    from lepton_jax.lake import Lake

    lake = Lake(args.lake).require()
    tables = [args.table] if args.table else lake.tables()
    if args.table and not lake.versions(args.table):
        lake.table(args.table)  # the 'no such table' error
    if not tables:
        print(f"lake {lake.root} has no tables")
    bad = []
    for table in tables:
        for version in lake.versions(table):
            try:
                tv = lake.table(table, version)
                counts = ", ".join(f"{s}={tv.num_examples(s)}" for s in tv.splits)
                src = tv.record["lineage"]["source"]
                line = (f"{table}@{tv.version}  {counts}  labels={len(tv.label_names)}  source={src['uri']} "
                        f"sha256={src['sha256'][:12]}")
            except (LakeError, KeyError, TypeError, AttributeError) as e:
                bad.append(f"{table}@{version}")
                line = f"UNREADABLE {table}@{version}: {e if isinstance(e, LakeError) else f'malformed record ({e!r})'}"
            print(line)
        bad += [f"{table}@{v} (its record is missing)" for v in lake.missing_versions(table)]
    if bad:
        raise LakeError(f"{len(bad)} version(s) could not be read: {', '.join(bad)} (run `lepton-jax lake verify`)")
    return 0


def log_command(args: argparse.Namespace) -> int:
    from lepton_jax.lake import Lake

    lake = Lake(args.lake)
    lake.table(args.table)  # a clear error for an unknown table
    for version in reversed(lake.versions(args.table)):
        r = lake.table(args.table, version).record
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))
        quarantined = (r.get("quarantine") or {}).get("num_examples", 0)
        print(f"version {version}  parent {r['parent'] or '-'}  {when}  commit {r['commit_id']}  "
              f"source {r['lineage']['source']['uri']} ({r['lineage']['source']['sha256'][:12]})  "
              f"split {json.dumps(r['lineage']['split'], sort_keys=True)}  quarantined {quarantined}")
    return 0


def show_command(args: argparse.Namespace) -> int:
    from lepton_jax.lake import Lake

    tv = Lake(args.lake).table(args.table, args.version)
    r = tv.record
    if args.json:
        print(json.dumps(r, indent=1, sort_keys=True))
        return 0
    print(f"{tv.table}@{tv.version}  parent {r['parent'] or '-'}  commit {r['commit_id']}")
    print(f"labels: {tv.label_names}")
    for name, meta in r["schema"]["arrays"].items():
        print(f"array {name}: {meta['dtype']} example shape {meta['example_shape']} range {meta['value_range']}")
        for c, (lo, hi) in enumerate(meta.get("column_ranges", [])):  # tabular: scaled per column
            label = meta["columns"][c] if "columns" in meta else f"column {c}"
            print(f"  {label}: range [{lo:.6g}, {hi:.6g}]")
    print(f"lineage: {json.dumps(r['lineage'], sort_keys=True)}")
    for split, entry in r["splits"].items():
        st = r["stats"].get("splits", {}).get(split, {})
        frags = tv.fragments(split)
        shards = sum(len([f for f in m.get("files", {}) if f != "zarr.json"]) for fr in frags
                     for m in fr["arrays"].values())
        print(f"split {split}: {entry['num_examples']} examples, {len(frags)} fragment(s), {shards} shard file(s), "
              f"class counts {st.get('class_counts')}")
        for name in r["schema"]["arrays"]:
            if name in st:
                print(f"  {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in st[name].items() if k != "columns"))
                if "columns" in st[name]:
                    cols = st[name]["columns"]
                    print(f"  {name} per column: mean " + " ".join(f"{v:.4g}" for v in cols["mean"])
                          + " | std " + " ".join(f"{v:.4g}" for v in cols["std"]))
    quarantined = tv.quarantine()
    print(f"quarantine: {len(quarantined)} example(s) {(r.get('quarantine') or {}).get('reasons', {})}")
    for e in quarantined[:20]:
        print(f"  {e['reason']}: {e['detail']}")
    if len(quarantined) > 20:
        print(f"  ... {len(quarantined) - 20} more (see --json and TableVersion.quarantine())")
    return 0


def verify_command(args: argparse.Namespace) -> int:
    from lepton_jax.errors import LakeError
    from lepton_jax.lake import Lake

    lake = Lake(args.lake)
    if not lake.exists():
        raise LakeError(f"lake {lake.root} does not exist")
    problems = lake.verify(args.table, args.version, content=not args.files_only)
    for p in problems:
        print(f"BAD {p}")
    if problems:
        raise LakeError(f"{len(problems)} problem(s) in lake {lake.root}; the data above cannot be trusted "
                        "(re-ingest the source, or restore the files)")
    tables = [args.table] if args.table else lake.tables()
    n = sum(len(lake.versions(t)) if args.version is None else 1 for t in tables)
    print(f"ok: {n} version(s) in {len(tables)} table(s) match their recorded digests")
    return 0


def gc_command(args: argparse.Namespace) -> int:
    from lepton_jax.errors import LakeError
    from lepton_jax.lake import Lake

    try:
        report = Lake(args.lake).gc(args.grace_seconds, table=args.table, dry_run=args.dry_run, force=args.force)
    except OSError as e:
        raise LakeError(f"gc of lake {args.lake} failed: {e}") from e
    verb = "would remove" if args.dry_run else "removed"
    for path in report.removed:
        print(f"{verb} {path}")
    print(f"{verb} {len(report.removed)} unreferenced path(s), {report.bytes_freed} bytes; kept "
          f"{len(report.kept_young)} younger than {args.grace_seconds:g} s")
    return 0
