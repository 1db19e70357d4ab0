"""Robustness table: standard, FGSM, FGSM-RS, free, PGD-AT and TRADES training on the embedded digits at two L∞
radii, evaluated on the test split with FGSM, PGD-k, PGD-k × restarts and the per-example worst case.

    .venv/bin/python scripts/robust_table.py [--out results/robust] [--epsilons 0.1 0.2]

Writes ``table.md``, ``results.json`` and ``accuracy_vs_eps.png`` into ``--out``; the lake and the runs go under
``--workdir`` (default ``runs/robust_table``). Each row trains from scratch (its run directory is replaced) with
``configs/robust_<row>.py`` and ``robust.epsilon`` set to the column's ε; the standard model is trained once.
Evaluated parameters are those of the final epoch. Training time includes compilation and is reported relative
to the standard row. When the standard row is trained, every other row is also attacked by transfer: PGD examples
crafted on the standard model (a surrogate that does not share the evaluated model's gradients) join the worst
case, and a warning says when they beat the white-box attacks.

Provenance is taken at start, before any training: the git revision, each row's training seed, the attack keys
(``--attack-seed`` for the per-ε evaluations, ``--attack-seed + 1`` for the curves); it is written to
``results.json`` and the table's first lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from lepton_jax.cli import run_script

ROOT = Path(__file__).resolve().parents[1]
ROWS = (("standard", "standard"), ("fgsm", "FGSM"), ("fgsm_rs", "FGSM-RS"), ("free", "free (m=4)"),
        ("pgd_at", "PGD-AT"), ("trades", "TRADES (β=6)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--out", default="results/robust", help="table, results.json and figure")
    parser.add_argument("--workdir", default="runs/robust_table", help="the lake and the training runs")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--rows", nargs="+", default=[r for r, _ in ROWS], choices=[r for r, _ in ROWS])
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--curve", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--config-override", nargs="*", default=[], help="key=value applied to every row")
    parser.add_argument("--attack-seed", type=int, default=0, help="attack key (curves use attack seed + 1)")
    args = parser.parse_args(argv)

    from lepton_jax import tracking

    revision = tracking.git_revision(ROOT) or "unknown"  # at start: the code that trains and evaluates

    import jax

    from lepton_jax.config import load_config
    from lepton_jax.data.transforms import prepare_batch
    from lepton_jax.lake import DigitsSource, Lake, ingest
    from lepton_jax.models import build_model
    from lepton_jax.robust.evaluate import (
        AttackSpec,
        Surrogate,
        accuracy_curve,
        check_eval_inputs,
        evaluate_robustness,
        save_curve_png,
        standard_attacks,
    )
    from lepton_jax.train.loop import train_and_evaluate
    from lepton_jax.train.state import split_model
    from lepton_jax.train.step import make_apply

    check_eval_inputs(list(args.epsilons) + list(args.curve), 1, steps=args.eval_steps, restarts=args.restarts)
    out = Path(args.out)
    lake_root = Path(args.workdir) / "lake"
    ingest(Lake(lake_root), "digits", DigitsSource())
    table = Lake(lake_root).table("digits")
    test = prepare_batch(table.reader("test").read_all(), table.schema)
    x, y = test["input"], test["label"]
    batch = len(y) + (-len(y)) % 8  # the whole split in one batch
    attacks_ = standard_attacks(args.eval_steps, args.restarts)
    names = {"fgsm": "FGSM", attacks_[1].name: f"PGD-{args.eval_steps}",
             attacks_[2].name: f"PGD-{args.eval_steps}×{args.restarts}",
             attacks_[3].name: f"PGD-{args.eval_steps} (CW)", "worst": "worst case"}
    apply, surrogate = None, None
    results, curves = [], {}
    eval_key, curve_key = args.attack_seed, args.attack_seed + 1
    jobs = [("standard", None)] if "standard" in args.rows else []
    jobs += [(row, eps) for eps in args.epsilons for row in args.rows if row != "standard"]
    for row, eps in jobs:
        tag = row if eps is None else f"{row}_eps{eps:g}"
        config = load_config(ROOT / "configs" / f"robust_{row}.py",
                             list(args.config_override) + ([f"robust.epsilon={eps}"] if eps is not None else []))
        workdir = Path(args.workdir) / tag
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"== training {tag}", flush=True)
        started = time.perf_counter()
        summary = train_and_evaluate(config, workdir, lake_root=lake_root, progress=False)
        wall = time.perf_counter() - started
        if apply is None:  # every row has the same model, so one apply (and one compile per attack) serves all
            model = build_model(config.model, input_shape=x.shape[1:], num_classes=len(table.label_names),
                                seed=config.seed)
            apply = make_apply(split_model(model)[0])
        params = jax.device_get(summary["final_state"].params)
        transfer = [surrogate] if surrogate is not None else []
        evals = {}
        for e in ([eps] if eps is not None else args.epsilons):
            r = evaluate_robustness(apply, params, x, y, epsilon=e, attacks_=attacks_,
                                    key=jax.random.PRNGKey(eval_key), batch_size=batch, surrogates=transfer)
            evals[f"{e:g}"] = {"accuracy": r["accuracy"], "diagnostics": r["diagnostics"], "warnings": r["warnings"]}
            print(f"   eps {e:g}: " + "  ".join(f"{k} {v:.3f}" for k, v in r["accuracy"].items()), flush=True)
            for w in r["warnings"]:
                print(f"   warning: {w}", flush=True)
        curves[tag] = accuracy_curve(apply, params, x, y, args.curve,
                                     attacks_=(AttackSpec("fgsm", kind="fgsm"), attacks_[1]),
                                     key=jax.random.PRNGKey(curve_key), batch_size=batch)
        if row == "standard":  # the surrogate of the transfer attack on every other row
            surrogate = Surrogate(apply, params, "transfer", dataclasses.replace(attacks_[1], name="transfer"))
        results.append({"row": row, "train_epsilon": eps, "seed": config.seed,
                        "train_seconds": summary["train_seconds"],
                        "wall_seconds": wall, "epochs": config.num_epochs, "steps": summary["steps"],
                        "eval": evals, "curve": curves[tag]})

    base = next((r["train_seconds"] for r in results if r["row"] == "standard"), None)
    label = dict(ROWS)
    cols = ["clean", "fgsm", attacks_[1].name, attacks_[2].name, attacks_[3].name, "transfer", "worst"]
    names["transfer"] = "transfer from standard"
    configs = sorted({f"configs/robust_{row}.py" for row, _ in ROWS})
    seeds = sorted({r["seed"] for r in results})
    lines = [f"configs: {', '.join(configs)}; data: digits@{table.version}; git revision at start: {revision}; "
             f"training seeds: {seeds}; attack keys: PRNGKey({eval_key}) per ε, PRNGKey({curve_key}) for curves", "",
             f"L∞ threat model on [0, 1] inputs; digits test split ({len(y)} examples); final-epoch parameters.",
             "", "| training | train ε | eval ε | clean | " + " | ".join(names[c] for c in cols[1:])
             + " | train time (× standard) |",
             "|" + "---|" * (len(cols) + 4)]
    warnings = []
    for eps in args.epsilons:
        for r in results:
            if r["train_epsilon"] not in (None, eps):
                continue
            acc = r["eval"][f"{eps:g}"]["accuracy"]
            rel = f"{r['train_seconds'] / base:.2f}" if base else "n/a"
            train_eps = "—" if r["train_epsilon"] is None else f"{r['train_epsilon']:g}"
            lines.append(f"| {label[r['row']]} | {train_eps} | {eps:g} | "
                         + " | ".join(f"{acc[c]:.3f}" if c in acc else "—" for c in cols) + f" | {rel} |")
            warnings += [f"{label[r['row']]} (train ε {train_eps}, eval ε {eps:g}): {w}"
                         for w in r["eval"][f"{eps:g}"]["warnings"]]
    lines += ["", f"Attacks: FGSM; PGD-{args.eval_steps} with random start, α = 2.5ε/{args.eval_steps}, CE loss; "
              f"the same with {args.restarts} restarts (per-example worst case); PGD-{args.eval_steps} with the CW "
              f"margin loss; transfer = PGD-{args.eval_steps} crafted on the standard model (rows other than "
              "standard); worst case = per-example worst over all of them.",
              "", "Gradient-masking checks: " + ("no warnings." if not warnings else "")]
    lines += [f"- {w}" for w in warnings]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    provenance = {"git_revision_at_start": revision, "training_seeds": seeds, "attack_seed": eval_key,
                  "curve_attack_seed": curve_key, "argv": sys.argv, "attacks": [a.__dict__ for a in attacks_]}
    (out / "results.json").write_text(json.dumps({"provenance": provenance, "rows": results}, indent=1))
    save_curve_png({_curve_label(t, label): c for t, c in curves.items()}, out / "accuracy_vs_eps.png",
                   title=f"digits, worst of FGSM / PGD-{args.eval_steps} per ε")
    print(text)
    print(f"wrote {out}/table.md results.json accuracy_vs_eps.png")
    return 0


def _curve_label(tag: str, label: dict[str, str]) -> str:
    row, _, eps = tag.partition("_eps")
    return label[row] + (f" (ε={eps})" if eps else "")


if __name__ == "__main__":
    sys.exit(run_script(main))
