"""`lepton-jax robust-eval`: robust accuracy of a run's checkpoint on a split of its pinned lake version.

    lepton-jax robust-eval --workdir runs/x [--epsilons 0.1 0.2] [--norm linf] [--steps 20] [--restarts 3]
                           [--square 300 | --white-box-only] [--surrogate runs/standard]

Reports clean, FGSM, PGD-k, PGD-k × restarts, PGD-k (CW loss), the gradient-free Square attack (L∞; by default
with a query budget scaled to the split, :func:`lepton_jax.robust.evaluate.default_square_queries`), a transfer
attack from each ``--surrogate`` run (PGD-k crafted on its best checkpoint), and the worst case: per example, the
minimum over every attack at that ε and every smaller ε of the accuracy-vs-ε curve (which runs every attack), the
same number wherever it is printed. Gradient-masking checks print named warnings (``[check-name] ...``).
``--white-box-only`` drops Square for speed and the output then says the result is unchecked. Writes
``robust.json`` and ``accuracy_vs_eps.png`` (atomically) into ``--output`` (default ``WORKDIR/robust``).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("robust-eval", help="adversarial robustness of a run's checkpoint (FGSM, PGD, worst case)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--epsilons", type=float, nargs="+", default=None,
                   help="radii in the model's input units (default: the run's robust.epsilon, else 0.1)")
    p.add_argument("--norm", choices=("linf", "l2"), default=None, help="default: the run's robust.norm, else linf")
    p.add_argument("--steps", type=int, default=20, help="PGD steps (step size 2.5ε/steps)")
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument("--curve", type=float, nargs="*", default=None,
                   help="ε values of the accuracy-vs-ε curve (default: 8 points up to 2× the largest ε)")
    p.add_argument("--seed", type=int, default=0, help="attack key")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--square", type=int, default=None, metavar="QUERIES",
                   help="queries per example of the gradient-free Square attack (L∞; default: a budget of about "
                        "200000 queries over the split, 300 to 1000 per example; 0 = off, the result unchecked)")
    p.add_argument("--white-box-only", action="store_true",
                   help="skip the gradient-free attacks for speed (Square; --surrogate still runs); the output then "
                        "says the result is unchecked against gradient masking")
    p.add_argument("--surrogate", action="append", default=[], metavar="WORKDIR",
                   help="a run (e.g. standardly trained) whose PGD examples are replayed: a transfer attack in the "
                        "worst case, with a warning when it beats white-box PGD (repeatable)")
    p.add_argument("--output", default=None, help="default: WORKDIR/robust")
    p.set_defaults(handler=robust_eval_command)


@functools.lru_cache(maxsize=8)
def _apply_for(graphdef):
    """One apply per model structure, so repeated evaluations reuse the compiled attacks."""
    from lepton_jax.models.functional import make_apply

    return make_apply(graphdef)


def evaluate_run(workdir: str | Path, *, epsilons: list[float] | None = None, norm: str | None = None,
                 split: str = "test", step: int | None = None, steps: int = 20, restarts: int = 3,
                 curve: list[float] | None = None, seed: int = 0, batch_size: int = 256,
                 output: str | Path | None = None, surrogates: list[str | Path] = (), square: int | None = None,
                 white_box_only: bool = False) -> dict[str, Any]:
    """Restores a run's checkpoint and evaluates its robustness (with Square, ``square`` queries per example, by
    default :func:`default_square_queries`; and transfer attacks from the best checkpoints of the ``surrogates``
    runs); writes and returns the results. ``checked`` in the result is False, with ``unchecked`` saying why, when
    no gradient-free attack ran."""
    import jax

    from lepton_jax import tracking
    from lepton_jax.checkpoint import open_checkpoints, read_run, restore_params
    from lepton_jax.data.transforms import INPUT, LABEL, prepare_batch
    from lepton_jax.errors import ConfigError
    from lepton_jax.lake import Lake
    from lepton_jax.parallel import batch_sharding, make_mesh
    from lepton_jax.parallel.mesh import data_parallel_size, mesh_config
    from lepton_jax.robust.evaluate import (
        AttackSpec,
        Surrogate,
        accuracy_curve,
        check_eval_inputs,
        curve_warnings,
        default_square_queries,
        save_curve_png,
        standard_attacks,
    )

    workdir = Path(workdir)
    config, run_info = read_run(workdir)
    robust = config.robust
    norm = norm or robust.norm
    epsilons = list(epsilons or [float(robust.epsilon)])
    check_eval_inputs(list(epsilons) + list(curve or []), batch_size, steps=steps, restarts=restarts)
    if square is not None and (square < 0 or (square and norm != "linf")):
        raise ConfigError(f"robust evaluation: --square takes a number of queries >= 0 and norm linf, got {square} "
                          f"with norm {norm}")
    data = run_info["data"]
    schema = data["schema"]
    mesh = make_mesh(mesh_config({"data": -1}))
    sharding = batch_sharding(mesh)
    batch_size += (-batch_size) % data_parallel_size(mesh)
    if step is None:  # robust evaluation defaults to the latest checkpoint
        ckpt = open_checkpoints(workdir / "checkpoints")
        step = ckpt.latest_step()
        ckpt.close()
    built, params, step = restore_params(workdir, step, mesh)
    if built.task.name != "classification":
        raise ConfigError(f"robust evaluation attacks classifiers only; {workdir} is a {built.task.name} model")
    graphdef = built.graphdef
    examples = prepare_batch(Lake(data["lake"]).table(data["table"], data["version"]).reader(split).read_all(),
                             schema)
    x, y = examples[INPUT], examples[LABEL]
    apply = _apply_for(graphdef)
    attacks_ = standard_attacks(steps, restarts)
    if square is None:
        square = 0 if white_box_only or norm != "linf" else default_square_queries(len(y))
    if square and not white_box_only:
        attacks_ += (AttackSpec("square", kind="square", steps=square),)
    surrogate_runs, surrogates_ = [], []
    for i, path in enumerate(surrogates):
        s_built, s_params, s_step = restore_params(Path(path), None, mesh)
        if s_built.input_shape != built.input_shape or s_built.num_classes != built.num_classes:
            raise ConfigError(f"surrogate {path} takes inputs {s_built.input_shape} with {s_built.num_classes} "
                              f"classes; {workdir} takes {built.input_shape} with {built.num_classes}")
        name = "transfer" if len(surrogates) == 1 else f"transfer{i + 1}"
        spec = AttackSpec(name, steps=steps, step_size=2.5 / steps)
        surrogate_runs.append({"name": name, "workdir": str(path), "step": s_step, "attack": spec.__dict__})
        surrogates_.append(Surrogate(_apply_for(s_built.graphdef), s_params, name, spec))
    key = jax.random.PRNGKey(seed)
    kw = dict(norm=norm, box=(0.0, 1.0), key=key, batch_size=batch_size, sharding=sharding)
    curve = curve if curve else [round(2 * max(epsilons) * i / 7, 4) for i in range(8)]
    # every attack at every ε of the curve, which includes the evaluated ones: one worst case wherever it is shown
    curve_result = accuracy_curve(apply, params, x, y, curve, attacks_=attacks_, surrogates=surrogates_,
                                  checked=epsilons, **kw)
    per_eps = curve_result.pop("results")
    gradient_free = [a.name for a in attacks_ if a.kind == "square"] + [s.name for s in surrogates_]
    unchecked = None if gradient_free else (
        "no gradient-free attack ran (" + ("--white-box-only" if white_box_only else "--square 0" if norm == "linf"
                                           else "Square is L∞ only; pass --surrogate for a transfer attack")
        + "): white-box attacks alone can call a gradient-masked model robust")
    out = Path(output) if output else workdir / "robust"
    result = {"workdir": str(workdir), "step": step, "split": split, "n": int(len(y)), "norm": norm,
              "attacks": [a.__dict__ for a in attacks_], "surrogates": surrogate_runs, "seed": seed,
              "checked": unchecked is None, "unchecked": unchecked,
              "results": {k: {"accuracy": r["accuracy"], "diagnostics": r["diagnostics"], "warnings": r["warnings"]}
                          for k, r in per_eps.items()},
              "curve": curve_result, "curve_warnings": curve_warnings(curve_result)}
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        tracking.write_json_atomic(out / "robust.json", result)
        save_curve_png({f"{Path(workdir).resolve().name} (step {step})": curve_result}, out / "accuracy_vs_eps.png",
                       title=f"{data['table']}@{data['version']} {split}: worst of every attack")
    result["output"] = str(out)
    return result


def robust_eval_command(args: argparse.Namespace) -> int:
    result = evaluate_run(args.workdir, epsilons=args.epsilons, norm=args.norm, split=args.split, step=args.step,
                          steps=args.steps, restarts=args.restarts, curve=args.curve, seed=args.seed,
                          batch_size=args.batch_size, output=args.output, surrogates=args.surrogate,
                          square=args.square, white_box_only=args.white_box_only)
    print(f"{args.workdir} checkpoint step {result['step']}, split {result['split']} ({result['n']} examples), "
          f"norm {result['norm']}:")
    square = [a["steps"] for a in result["attacks"] if a["kind"] == "square"]
    if square:
        print(f"  square: {square[0]} queries per example (gradient-free)")
    for eps, r in result["results"].items():
        print(f"  eps {eps}: " + "  ".join(f"{k} {v:.4f}" for k, v in r["accuracy"].items()))
        print(f"  worst case at eps {eps}: {r['accuracy']['worst']:.4f} (per example, minimum over every attack "
              "above, at this and every smaller eps of the curve)")
        for w in r["warnings"]:
            print(f"  warning: {w}")
    for w in result["curve_warnings"]:
        print(f"  warning: {w}")
    c = result["curve"]
    print("  worst-case accuracy vs eps (every attack): " + ", ".join(
        f"{e:g}: {a:.3f}" for e, a in zip(c["epsilons"], c["worst"], strict=True)))
    if not result["checked"]:
        print(f"  UNCHECKED: {result['unchecked']}")
    print(f"wrote {result['output']}/robust.json accuracy_vs_eps.png")
    return 0
