"""`lepton-jax registry|export|serve`: register checkpoints in the lake, export edge artifacts, run a model server."""

from __future__ import annotations

import argparse
import json
import os


def register(sub: argparse._SubParsersAction) -> None:
    reg = sub.add_parser("registry", help="model registry in the lake: register, list, show, promote, compare, "
                                          "rollback").add_subparsers(dest="registry_command", required=True)
    add = reg.add_parser("register", help="register a run's checkpoint (default: best) as a new model version")
    add.add_argument("--lake", required=True)
    add.add_argument("--name", required=True, help="model name")
    add.add_argument("--workdir", required=True, help="run directory of `lepton-jax train`")
    add.add_argument("--step", type=int, default=None, help="checkpoint step (default: best on dev)")
    add.add_argument("--description", default="")
    add.add_argument("--promote", default=None, metavar="STAGE", help="also promote it, e.g. production")
    add.set_defaults(handler=register_command)
    ls = reg.add_parser("ls", help="list models, versions and stages")
    ls.add_argument("--lake", required=True)
    ls.set_defaults(handler=ls_command)
    show = reg.add_parser("show", help="print a version's record (NAME, NAME@VERSION or NAME@STAGE)")
    show.add_argument("--lake", required=True)
    show.add_argument("model")
    show.set_defaults(handler=show_command)
    promote = reg.add_parser("promote", help="point a stage (default production) at NAME@VERSION; with --if-better "
                                             "only if it is not worse than the stage's holder (exit 1 if refused)")
    promote.add_argument("--lake", required=True)
    promote.add_argument("model", help="NAME@VERSION")
    promote.add_argument("--stage", default="production")
    promote.add_argument("--if-better", action="store_true",
                         help="gate: compare with the stage's holder first; refuse (exit 1) if worse by > --tolerance")
    promote.add_argument("--tolerance", type=float, default=0.0, help="with --if-better: allowed drop (default 0)")
    _gate_data(promote)
    promote.set_defaults(handler=promote_command)
    compare = reg.add_parser("compare", help="compare NAME@VERSION with a stage's holder on pinned data (exit 1 if "
                                             "the gate would refuse it)")
    compare.add_argument("--lake", required=True)
    compare.add_argument("model", help="NAME@VERSION (the candidate)")
    compare.add_argument("--stage", default="production")
    compare.add_argument("--tolerance", type=float, default=0.0, help="allowed drop (default 0)")
    _gate_data(compare)
    compare.set_defaults(handler=compare_command)
    rollback = reg.add_parser("rollback", help="restore the version a stage held before its latest promotion")
    rollback.add_argument("--lake", required=True)
    rollback.add_argument("name", help="model name")
    rollback.add_argument("--stage", default="production")
    rollback.add_argument("--to", type=int, default=None, metavar="VERSION",
                          help="an earlier holder to restore (default: the one before the latest promotion)")
    rollback.set_defaults(handler=rollback_command)
    history = reg.add_parser("history", help="a stage's promotions and rollbacks, oldest first")
    history.add_argument("--lake", required=True)
    history.add_argument("name", help="model name")
    history.add_argument("--stage", default="production")
    history.set_defaults(handler=history_command)

    gc = reg.add_parser("gc", help="remove parameter copies no record references and temp records (left by a crash)")
    gc.add_argument("--lake", required=True)
    gc.add_argument("--grace-seconds", type=float, default=3600.0,
                    help="only copies older than this (default 3600; under 60 needs --force)")
    gc.add_argument("--force", action="store_true", help="allow a grace under 60 s (no registration running)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed")
    gc.set_defaults(handler=gc_command)

    exp = sub.add_parser("export", help="export a model as a jax.export edge artifact (runs with jax + numpy only)")
    exp.add_argument("--lake", default=None, help="registry lake (with --model)")
    exp.add_argument("--model", default=None, help="NAME@VERSION or NAME@STAGE from the registry")
    exp.add_argument("--workdir", default=None, help="or: a run directory")
    exp.add_argument("--output", required=True, help="new artifact directory")
    exp.add_argument("--int8", action="store_true", help="per-channel int8 weights (about 4x smaller)")
    exp.add_argument("--platforms", default="cpu,cuda", help="comma-separated jax platforms to export for")
    exp.set_defaults(handler=export_command)

    srv = sub.add_parser("serve", help="serve registry models over HTTP (KServe v2 protocol, /metrics)")
    srv.add_argument("--lake", required=True, help="lake holding the model registry")
    srv.add_argument("--model", action="append", required=True,
                     help="NAME@STAGE or NAME@VERSION (repeat for several models)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--replicas", type=int, default=1, help="model replicas, spread over the devices")
    srv.add_argument("--max-batch-size", type=int, default=32)
    srv.add_argument("--max-delay-ms", type=float, default=2.0, help="longest wait for a batch to fill")
    srv.add_argument("--max-queue-rows", type=int, default=1024, help="queued rows beyond which requests get 429")
    srv.add_argument("--timeout-s", type=float, default=10.0, help="per-request timeout (504)")
    srv.add_argument("--max-request-rows", type=int, default=1024,
                     help="rows per request (413 beyond it, or beyond --max-queue-rows)")
    srv.add_argument("--max-body-mb", type=float, default=None,
                     help="request body limit (413); default: the largest legal request as JSON, plus 64 KiB")
    srv.add_argument("--drain-grace-s", type=float, default=5.0,
                     help="after SIGTERM: seconds of serving with readiness 503 before the listener closes")
    # hostile conditions: slow and stalled clients, connection cap, bounded shutdown (docs/serving.md)
    srv.add_argument("--drain-timeout-s", type=float, default=15.0,
                     help="after the grace period: seconds to finish in-flight requests before answering them 503 "
                          "(grace + this must fit the orchestrator's termination grace; default 5 + 15)")
    srv.add_argument("--body-timeout-s", type=float, default=30.0,
                     help="a request body must arrive within this (else 408 and the connection closes)")
    srv.add_argument("--idle-timeout-s", type=float, default=5.0,
                     help="a connection with no request in progress for this long is closed")
    srv.add_argument("--max-connections", type=int, default=1000,
                     help="requests on connections beyond this many get 503 (the open-file limit is raised to fit)")
    srv.add_argument("--token-env", default="LEPTON_SERVE_TOKEN",
                     help="environment variable holding a bearer token; when set, requests must carry it")
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    srv.add_argument("--backend", default="uvicorn", choices=["uvicorn", "ray"],
                     help="uvicorn: this process; ray: a Ray Serve application (replicas across a Ray cluster)")
    srv.add_argument("--ray-address", default=None,
                     help="with --backend ray: the cluster to join (e.g. auto); default: start a local Ray")
    srv.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="with --backend ray")
    srv.add_argument("--follow", action="store_true",
                     help="follow each NAME@STAGE (NAME@latest: the newest version): when it moves, load, warm "
                          "and swap in the new version with no downtime (a version that fails to load is refused; "
                          "the old one keeps serving)")
    srv.add_argument("--follow-interval-s", type=float, default=2.0,
                     help="with --follow: seconds between registry polls (default 2)")
    srv.add_argument("--canary", default=None, metavar="STAGE:PERCENT",
                     help="answer PERCENT%% of requests with the version at STAGE (e.g. staging:10)")
    srv.add_argument("--shadow", default=None, metavar="STAGE",
                     help="mirror every request to the version at STAGE and count its top-1 agreement (never answers)")
    srv.set_defaults(handler=serve_command)


def register_command(args: argparse.Namespace) -> int:
    from lepton_jax.serve.registry import Registry

    registry = Registry(args.lake)
    entry = registry.register(args.name, args.workdir, step=args.step, description=args.description)
    metrics = entry.record["metrics"]
    params = entry.record["params"]
    name = str(metrics.get("best_metric", "dev_accuracy")).removeprefix("dev_")  # the run's headline metric
    if not isinstance(metrics.get(f"test_{name}"), int | float):
        name = "accuracy"
    print(f"registered {entry.ref}: checkpoint {entry.workdir} step {entry.step} copied to "
          f"{registry.storage.uri}/{params['key']} ({params['bytes']:,} bytes, sha256 {params['sha256'][:12]}), "
          f"data {entry.record['data']['table']}@{entry.record['data']['version']}, test {name} "
          f"{metrics.get(f'test_{name}')}")
    if args.promote:
        registry.promote(entry.name, entry.version, args.promote)
        print(f"promoted {entry.ref} to {args.promote}")
    return 0


def ls_command(args: argparse.Namespace) -> int:
    from lepton_jax.serve.registry import Registry

    registry = Registry(args.lake)
    names = registry.names()
    if not names:
        print(f"no models registered in {registry.uri}")
    for name in names:
        stages = registry.stages(name)
        for version in registry.versions(name):
            entry = registry.get(name, version)
            tags = [s for s, v in stages.items() if v == version]
            where = "lake" if entry.self_sufficient else f"run {entry.workdir} (re-register)"
            print(f"{entry.ref}  step={entry.step}  params={where}  data={entry.record['data']['table']}@"
                  f"{entry.record['data']['version']}  test_accuracy={entry.record['metrics'].get('test_accuracy')}"
                  f"{'  [' + ', '.join(tags) + ']' if tags else ''}")
    return 0


def show_command(args: argparse.Namespace) -> int:
    from lepton_jax.serve.registry import Registry

    record = dict(Registry(args.lake).resolve(args.model).record)
    reference = record.pop("reference", None)
    record.pop("config", None)
    print(json.dumps(record, indent=1, sort_keys=True))
    if reference:
        print(f"drift reference: {reference['num_examples']} {reference['split']} examples, "
              f"{len(reference['groups'])} feature groups x {reference['bins']} bins")
    return 0


EXIT_REFUSED = 1  # `registry promote --if-better` / `registry compare`: the gate refused the candidate


def _gate_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="test", help="split both versions are scored on (default test)")
    parser.add_argument("--table-version", type=int, default=None,
                        help="pinned table version (default: the one the candidate was trained on)")
    parser.add_argument("--metric", default="accuracy",
                        help="`lepton-jax eval`'s metric to compare: accuracy (default), macro_f1 or weighted_f1")


def _name_version(ref: str, command: str) -> tuple[str, int]:
    from lepton_jax.serve.registry import RegistryError

    name, _, version = ref.partition("@")
    if not version.isdigit():
        raise RegistryError(f"{command} takes NAME@VERSION with a version number, got {ref!r}")
    return name, int(version)


def promote_command(args: argparse.Namespace) -> int:
    import sys

    from lepton_jax.serve.gate import describe
    from lepton_jax.serve.registry import PromotionRefused, Registry

    name, version = _name_version(args.model, "promote")
    try:
        entry = Registry(args.lake).promote(name, version, args.stage, if_better=args.if_better,
                                            tolerance=args.tolerance, split=args.split,
                                            table_version=args.table_version, metric=args.metric)
    except PromotionRefused as e:
        print(e, file=sys.stderr)  # "refused to promote NAME@V <metric> <value> < ...": one line
        return EXIT_REFUSED
    gate = f"; gate: {describe(entry['comparison'], name)}" if entry["comparison"] else " (ungated)"
    print(f"{args.stage}: {name}@{entry['version']} (was {entry['previous']}){gate}")
    return 0


def compare_command(args: argparse.Namespace) -> int:
    from lepton_jax.serve.gate import PROMOTE, describe
    from lepton_jax.serve.registry import Registry

    name, version = _name_version(args.model, "compare")
    comparison = Registry(args.lake).compare(name, version, args.stage, split=args.split,
                                             table_version=args.table_version, metric=args.metric,
                                             tolerance=args.tolerance)
    print(json.dumps(comparison, indent=1, sort_keys=True))
    print(f"{comparison['decision']}: {describe(comparison, name)}")
    return 0 if comparison["decision"] == PROMOTE else EXIT_REFUSED


def rollback_command(args: argparse.Namespace) -> int:
    from lepton_jax.serve.registry import Registry

    entry = Registry(args.lake).rollback(args.name, args.stage, to=args.to)
    print(f"{args.stage}: rolled back from {args.name}@{entry['from']} to {args.name}@{entry['to']}")
    return 0


def history_command(args: argparse.Namespace) -> int:
    from lepton_jax.serve.gate import pinned_data
    from lepton_jax.serve.registry import Registry

    registry = Registry(args.lake)
    registry.get(args.name)
    for entry in registry.history(args.name, args.stage):
        how = "rollback" if entry.get("rollback") else "gated" if entry.get("gated") else "ungated"
        c = entry.get("comparison")
        gate = ""
        if c:
            held = c["incumbent"]
            gate = (f"  {c['metric']} {c['candidate']['value']:.4f} vs "
                    f"{'none' if held is None else format(held['value'], '.4f')} on {pinned_data(c)}")
        print(f"{entry['sequence']:>4}  {args.name}@{entry['version']}  (was {entry['previous']})  {how}{gate}")
    return 0


def gc_command(args: argparse.Namespace) -> int:
    from lepton_jax.serve.registry import Registry

    removed = Registry(args.lake).gc(args.grace_seconds, force=args.force, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(removed)} unreferenced parameter cop{'y' if len(removed) == 1 else 'ies'} or temp record(s)")
    for key in removed:
        print(f"  {key}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    from lepton_jax.errors import LeptonError
    from lepton_jax.serve.export import export_artifact
    from lepton_jax.serve.registry import Registry

    if bool(args.model) == bool(args.workdir):
        raise LeptonError("export needs either --lake LAKE --model NAME@VERSION or --workdir RUN")
    source = args.workdir
    if args.model:
        if not args.lake:
            raise LeptonError("--model needs --lake (the lake holding the registry)")
        source = Registry(args.lake).resolve(args.model)
    manifest = export_artifact(source, args.output, quantize="int8" if args.int8 else None,
                               platforms=tuple(p for p in args.platforms.split(",") if p))
    ev = manifest.get("evaluation", {})
    print(f"wrote {args.output}: {manifest['size_bytes']:,} bytes ({manifest['quantization']['scheme']} weights), "
          f"platforms {', '.join(manifest['platforms'])}")
    if ev and "float_accuracy" in ev:
        print(f"{ev['split']} split ({ev['num_examples']} examples): float accuracy {ev['float_accuracy']:.4f}, "
              f"artifact accuracy {ev['artifact_accuracy']:.4f}, top-1 agreement {ev['top1_agreement']:.4f}")
    elif ev:  # other tasks: their headline metric, and how closely the artifact's predictions follow the float model's
        metric = ev["metric"]
        close = [f"{k} agreement {v:.4f}" for k, v in ev["agreement"].items()]
        close += [f"{k} max |difference| {v:.3g}" for k, v in ev["max_abs_difference"].items()]
        print(f"{ev['split']} split ({ev['num_examples']} examples): float {metric} "
              f"{ev['float_metrics'][metric]:.4f}, artifact {metric} {ev['artifact_metrics'][metric]:.4f}; "
              + ", ".join(close))
    print(f"outputs (python {args.output}/edge_runner.py {args.output} EXAMPLES.npy): "
          + ", ".join(o["name"] for o in manifest["task"]["outputs"]))
    return 0


def configure_logging(level: str) -> None:
    """Our loggers at ``level`` on stderr, whatever absl or a library configured on the root logger first."""
    import logging

    logger = logging.getLogger("lepton_jax")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_lepton_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler._lepton_cli = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


def serve_command(args: argparse.Namespace) -> int:
    from lepton_jax.serve.startup import exit_on_signals_during_start_up

    with exit_on_signals_during_start_up():  # before the heavy imports: Ctrl-C or SIGTERM exits at once until serving
        return _serve(args)


def check_port_free(host: str, port: int) -> None:
    """One line (exit 2) when ``host:port`` cannot be listened on, before any model loads or heavy import (the
    server would otherwise find out only after loading every model). Binds with SO_REUSEADDR, as uvicorn does, so only
    a port another socket listens on (or a host this machine does not have) is refused."""
    import socket

    from lepton_jax.errors import LeptonError

    if port == 0:  # the OS picks a free one
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise LeptonError(f"--host {host!r} is not an address of this machine ({e.strerror})") from e
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise LeptonError(f"cannot listen on {host}:{port}: {e.strerror}; stop what uses it or pass a free "
                              "--port") from e


def _serve(args: argparse.Namespace) -> int:
    check_port_free(args.host, args.port)
    import logging

    from lepton_jax.errors import LeptonError
    from lepton_jax.serve.lifecycle import parse_canary
    from lepton_jax.serve.server import ModelServer, ServeConfig, ServedModel, run_server

    configure_logging(args.log_level)
    token = os.environ.get(args.token_env) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        logging.getLogger("lepton_jax.serve").warning("binding %s without a token: anyone who can reach this "
                                                      "address can use the model", args.host)
    for flag in ("max_batch_size", "max_queue_rows", "max_request_rows", "replicas", "max_connections"):
        if getattr(args, flag) < 1:
            raise LeptonError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("drain_timeout_s", "body_timeout_s", "idle_timeout_s"):
        if not getattr(args, flag) > 0:
            raise LeptonError(f"--{flag.replace('_', '-')} must be a positive number of seconds, got "
                              f"{getattr(args, flag)}")
    config = ServeConfig(max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms,
                         max_queue_rows=args.max_queue_rows, request_timeout_s=args.timeout_s,
                         max_request_rows=args.max_request_rows,
                         max_body_bytes=None if args.max_body_mb is None else int(args.max_body_mb * (1 << 20)),
                         replicas=args.replicas, token=token, drain_grace_s=args.drain_grace_s,
                         drain_timeout_s=args.drain_timeout_s, body_timeout_s=args.body_timeout_s,
                         idle_timeout_s=args.idle_timeout_s, max_connections=args.max_connections,
                         follow=args.follow, follow_interval_s=args.follow_interval_s, canary=args.canary,
                         shadow=args.shadow)
    if not args.follow_interval_s > 0:
        raise LeptonError(f"--follow-interval-s must be positive, got {args.follow_interval_s}")
    parse_canary(args.canary)  # a malformed STAGE:PERCENT is one line before any model loads
    if args.backend == "ray" and (args.canary or args.shadow):
        raise LeptonError("--canary and --shadow need --backend uvicorn (docs/serving.md, 'Following a stage')")
    if args.backend == "ray":
        if args.ray_address is None and args.host in ("127.0.0.1", "localhost", "::1"):  # set before ray's import
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's one-machine mode: all loopback
        from lepton_jax.serve.ray_serve import run_ray

        run_ray(args.lake, args.model, config, host=args.host, port=args.port, address=args.ray_address,
                num_cpus=args.num_cpus_per_replica)
        return 0
    models = [ServedModel.from_registry(args.lake, ref) for ref in args.model]
    run_server(ModelServer(models, config), host=args.host, port=args.port, log_level=args.log_level)
    return 0
