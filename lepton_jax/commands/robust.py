"""`lepton-jax robust-eval`: robust accuracy of a run's checkpoint on a split of its pinned lake version.

    lepton-jax robust-eval --workdir runs/x [--epsilons 0.1 0.2] [--norm linf] [--steps 20] [--restarts 3]
                           [--square 300] [--surrogate runs/standard]

Reports clean, FGSM, PGD-k, PGD-k × restarts, PGD-k (CW loss), with ``--square Q`` the gradient-free Square attack
(Q queries), a transfer attack from each ``--surrogate`` run (PGD-k crafted on its best checkpoint) and the
per-example worst case at each ε, plus the
accuracy-vs-ε curve and gradient-masking warnings; writes ``robust.json`` and ``accuracy_vs_eps.png`` (atomically)
into ``--output`` (default ``WORKDIR/robust``).
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
    p.add_argument("--square", type=int, default=0, metavar="QUERIES",
                   help="also run the gradient-free Square attack (L∞) with this many queries, e.g. 300 (0 = off)")
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
                 output: str | Path | None = None, surrogates: list[str | Path] = (), square: int = 0
                 ) -> dict[str, Any]:
    """Restores a run's checkpoint and evaluates its robustness (with transfer attacks from the best checkpoints
    of the ``surrogates`` runs); writes and returns the results."""
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
        evaluate_robustness,
        save_curve_png,
        standard_attacks,
    )

    workdir = Path(workdir)
    config, run_info = read_run(workdir)
    robust = config.robust
    norm = norm or robust.norm
    epsilons = list(epsilons or [float(robust.epsilon)])
    check_eval_inputs(list(epsilons) + list(curve or []), batch_size, steps=steps, restarts=restarts)
    if square < 0 or (square and norm != "linf"):
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
    graphdef = built.graphdef
    examples = prepare_batch(Lake(data["lake"]).table(data["table"], data["version"]).reader(split).read_all(),
                             schema)
    x, y = examples[INPUT], examples[LABEL]
    apply = _apply_for(graphdef)
    attacks_ = standard_attacks(steps, restarts)
    if square:
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
    per_eps = {f"{e:g}": evaluate_robustness(apply, params, x, y, epsilon=e, attacks_=attacks_,
                                             surrogates=surrogates_, **kw)
               for e in epsilons}
    curve = curve if curve else [round(2 * max(epsilons) * i / 7, 4) for i in range(8)]
    curve_result = accuracy_curve(apply, params, x, y, curve, attacks_=attacks_[:2], surrogates=surrogates_, **kw)
    out = Path(output) if output else workdir / "robust"
    result = {"workdir": str(workdir), "step": step, "split": split, "n": int(len(y)), "norm": norm,
              "attacks": [a.__dict__ for a in attacks_], "surrogates": surrogate_runs, "seed": seed,
              "results": {k: {"accuracy": r["accuracy"], "diagnostics": r["diagnostics"], "warnings": r["warnings"]}
                          for k, r in per_eps.items()},
              "curve": curve_result}
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        tracking.write_json_atomic(out / "robust.json", result)
        save_curve_png({f"step {step}": curve_result}, out / "accuracy_vs_eps.png",
                       title=f"{data['table']}@{data['version']} {split}: worst of FGSM / {attacks_[1].name}"
                       + (" / transfer" if surrogates_ else ""))
    result["output"] = str(out)
    return result


def robust_eval_command(args: argparse.Namespace) -> int:
    result = evaluate_run(args.workdir, epsilons=args.epsilons, norm=args.norm, split=args.split, step=args.step,
                          steps=args.steps, restarts=args.restarts, curve=args.curve, seed=args.seed,
                          batch_size=args.batch_size, output=args.output, surrogates=args.surrogate,
                          square=args.square)
    print(f"{args.workdir} checkpoint step {result['step']}, split {result['split']} ({result['n']} examples), "
          f"norm {result['norm']}:")
    for eps, r in result["results"].items():
        print(f"  eps {eps}: " + "  ".join(f"{k} {v:.4f}" for k, v in r["accuracy"].items()))
        for w in r["warnings"]:
            print(f"  warning: {w}")
    c = result["curve"]
    print("  worst-case accuracy vs eps: " + ", ".join(f"{e:g}: {a:.3f}" for e, a in zip(c["epsilons"], c["worst"],
                                                                                       strict=True)))
    print(f"wrote {result['output']}/robust.json accuracy_vs_eps.png")
    return 0
