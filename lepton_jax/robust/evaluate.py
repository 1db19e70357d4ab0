"""Robust evaluation a reviewer can trust: clean, FGSM, PGD-k, PGD-k × restarts, transfer attacks from surrogate
models, the per-example worst case over all attacks, accuracy-vs-ε curves, and automatic warnings for signs of
gradient masking.

A transfer attack crafts PGD examples on a *surrogate* (e.g. a standardly trained model of the same task) and
replays them against the evaluated model. It needs no gradient of the evaluated model, so it is immune to masked,
noisy or shattered gradients; when it beats the white-box attacks, their numbers are not to be trusted (the
evaluation warns) and the worst case, which includes it, falls to at most its accuracy.

The attacks are compiled once per (model, attack family, norm, box), with ε, step size, steps and restarts as
traced arguments, and run on fixed-size batches (the last one padded), optionally placed on a batch sharding.
Batch ``i`` uses ``fold_in(key, i)``, so the results do not depend on the mesh. All attacks of an evaluation
share one key, so PGD-k × R contains PGD-k (its first restart) and is never weaker.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lepton_jax import tracking
from lepton_jax.errors import ConfigError
from lepton_jax.robust import attacks


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack of an evaluation. ``step_size`` is a fraction of ε."""

    name: str
    kind: str = "pgd"  # fgsm | pgd | square (gradient-free, L∞: ``steps`` is its number of queries)
    steps: int = 10
    step_size: float = 0.25
    restarts: int = 1
    random_init: bool = True
    loss: str = "ce"


@dataclasses.dataclass(frozen=True)
class Surrogate:
    """A model whose white-box adversarial examples (``spec``, a PGD or FGSM attack) are replayed against the
    evaluated model: a transfer attack named ``name``."""

    apply: Callable
    params: Any
    name: str = "transfer"
    spec: AttackSpec = AttackSpec("transfer", steps=20, step_size=0.125)


def check_eval_inputs(epsilons: Sequence[float], batch_size: int, *, steps: int = 1, restarts: int = 1) -> None:
    """One-line :class:`ConfigError` for radii that are not finite and >= 0, or sizes < 1."""
    bad = [e for e in epsilons if not (math.isfinite(float(e)) and float(e) >= 0)]
    if bad:
        raise ConfigError(f"robust evaluation: epsilons must be finite and >= 0, got {', '.join(map(str, bad))}")
    for name, value in (("batch size", batch_size), ("steps", steps), ("restarts", restarts)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"robust evaluation: {name} must be an integer >= 1, got {value!r}")


# The default Square budget: about this many model queries over the whole split (each example gets
# SQUARE_BUDGET // n queries), within [SQUARE_MIN_QUERIES, SQUARE_MAX_QUERIES] per example.
SQUARE_BUDGET = 200_000
SQUARE_MIN_QUERIES, SQUARE_MAX_QUERIES = 300, 1000


def default_square_queries(n: int) -> int:
    """Square's queries per example for a split of ``n`` examples (the default budget, scaled to the split)."""
    return int(min(SQUARE_MAX_QUERIES, max(SQUARE_MIN_QUERIES, SQUARE_BUDGET // max(n, 1))))


def standard_attacks(steps: int = 20, restarts: int = 3) -> tuple[AttackSpec, ...]:
    """FGSM, PGD-k (CE), PGD-k × restarts (CE) and PGD-k with the CW margin loss (which is blind to logit scale)."""
    step = 2.5 / steps
    return (AttackSpec("fgsm", kind="fgsm"),
            AttackSpec(f"pgd{steps}", steps=steps, step_size=step),
            AttackSpec(f"pgd{steps}x{restarts}", steps=steps, step_size=step, restarts=restarts),
            AttackSpec(f"pgd{steps}_cw", steps=steps, step_size=step, loss="cw"))


@functools.lru_cache(maxsize=64)
def _compiled_attack(apply: Callable, kind: str, loss: str, random_init: bool, norm: str, box: attacks.Box
                     ) -> Callable:
    """``fn(params, x, y, key, epsilon, step_size, steps, restarts) -> correct`` (bool per example), jitted once
    per attack family: ε, step size, steps and restarts are traced arguments."""

    def run(params, x, y, key, epsilon, step_size, steps, restarts):
        if kind == "fgsm":
            x_adv = attacks.fgsm(apply, params, x, y, epsilon=epsilon, norm=norm, box=box, loss=loss)
        elif kind == "square":
            x_adv = attacks.square_linf(apply, params, x, y, key, epsilon=epsilon, box=box, queries=steps)
        elif kind == "pgd":
            x_adv = attacks.pgd(apply, params, x, y, key, epsilon=epsilon, norm=norm, box=box, steps=steps,
                                step_size=step_size, random_init=random_init, restarts=restarts, loss=loss)
        else:
            raise ValueError(f"unknown attack kind {kind!r}; use fgsm, pgd or square")
        return jnp.argmax(apply(params, x_adv, train=False), -1) == y

    return jax.jit(run)


@functools.lru_cache(maxsize=16)
def _compiled_transfer(source_apply: Callable, target_apply: Callable, kind: str, loss: str, random_init: bool,
                       norm: str, box: attacks.Box) -> Callable:
    """``fn(source_params, target_params, x, y, key, epsilon, step_size, steps, restarts) -> correct``: the
    attack runs on the source (surrogate) model, the correctness is the target's."""

    def run(source_params, target_params, x, y, key, epsilon, step_size, steps, restarts):
        if kind == "fgsm":
            x_adv = attacks.fgsm(source_apply, source_params, x, y, epsilon=epsilon, norm=norm, box=box, loss=loss)
        else:
            x_adv = attacks.pgd(source_apply, source_params, x, y, key, epsilon=epsilon, norm=norm, box=box,
                                steps=steps, step_size=step_size, random_init=random_init, restarts=restarts,
                                loss=loss)
        return jnp.argmax(target_apply(target_params, x_adv, train=False), -1) == y

    return jax.jit(run)


@functools.lru_cache(maxsize=16)
def _compiled_clean(apply: Callable) -> Callable:
    """``fn(params, x, y) -> (correct, input-gradient norm)`` per example, CE loss, inference mode."""

    def run(params, x, y):
        def total(z):
            return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(apply(params, z, train=False), y))

        grad = jax.grad(total)(x)
        correct = jnp.argmax(apply(params, x, train=False), -1) == y
        return correct, attacks.perturbation_norm(grad, "l2")

    return jax.jit(run)


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, sharding: NamedSharding | None):
    n = x.shape[0]
    for i, start in enumerate(range(0, n, batch_size)):
        idx = np.minimum(np.arange(start, start + batch_size), n - 1)
        valid = min(batch_size, n - start)
        xb, yb = np.asarray(x[idx], np.float32), np.asarray(y[idx], np.int32)
        if sharding is not None:
            xb, yb = jax.device_put(xb, sharding), jax.device_put(yb, sharding)
        yield i, xb, yb, valid


def _place_params(params: Any, sharding: NamedSharding | None) -> Any:
    return params if sharding is None else jax.device_put(params, NamedSharding(sharding.mesh, P()))


def attack_correct(apply: Callable, params: Any, x: np.ndarray, y: np.ndarray, spec: AttackSpec, *,
                   epsilon: float, norm: str = "linf", box: attacks.Box = (0.0, 1.0), key: jax.Array,
                   batch_size: int = 256, sharding: NamedSharding | None = None) -> np.ndarray:
    """Per-example correctness (bool, shape (N,)) under one attack at radius ``epsilon``."""
    fn = _compiled_attack(apply, spec.kind, spec.loss, spec.random_init, norm, box)
    params = _place_params(params, sharding)
    settings = (jnp.float32(epsilon), jnp.float32(spec.step_size), jnp.int32(spec.steps), jnp.int32(spec.restarts))
    out = [np.asarray(fn(params, xb, yb, jax.random.fold_in(key, i), *settings))[:valid]
           for i, xb, yb, valid in _batches(x, y, batch_size, sharding)]
    return np.concatenate(out)


def transfer_correct(apply: Callable, params: Any, x: np.ndarray, y: np.ndarray, surrogate: Surrogate, *,
                     epsilon: float, norm: str = "linf", box: attacks.Box = (0.0, 1.0), key: jax.Array,
                     batch_size: int = 256, sharding: NamedSharding | None = None) -> np.ndarray:
    """Per-example correctness of ``apply`` on adversarial examples crafted on the surrogate (a transfer attack)."""
    spec = surrogate.spec
    fn = _compiled_transfer(surrogate.apply, apply, spec.kind, spec.loss, spec.random_init, norm, box)
    source, target = _place_params(surrogate.params, sharding), _place_params(params, sharding)
    settings = (jnp.float32(epsilon), jnp.float32(spec.step_size), jnp.int32(spec.steps), jnp.int32(spec.restarts))
    out = [np.asarray(fn(source, target, xb, yb, jax.random.fold_in(key, i), *settings))[:valid]
           for i, xb, yb, valid in _batches(x, y, batch_size, sharding)]
    return np.concatenate(out)


def clean_diagnostics(apply: Callable, params: Any, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256,
                      sharding: NamedSharding | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Clean per-example correctness and the L2 norm of each example's input gradient (CE loss)."""
    fn = _compiled_clean(apply)
    params = _place_params(params, sharding)
    correct, norms = [], []
    for _, xb, yb, valid in _batches(x, y, batch_size, sharding):
        c, g = fn(params, xb, yb)
        correct.append(np.asarray(c)[:valid])
        norms.append(np.asarray(g)[:valid])
    return np.concatenate(correct), np.concatenate(norms)


def large_epsilon(norm: str, box: attacks.Box, example_shape: Sequence[int]) -> float:
    """A radius that reaches every point of the box: its width (L∞) or its diagonal (L2)."""
    width = 1.0 if box is None else float(box[1] - box[0])
    return width if norm == "linf" else width * math.sqrt(math.prod(example_shape))


def evaluate_robustness(apply: Callable, params: Any, x: np.ndarray, y: np.ndarray, *, epsilon: float,
                        norm: str = "linf", box: attacks.Box = (0.0, 1.0),
                        attacks_: Sequence[AttackSpec] | None = None, key: jax.Array | None = None,
                        batch_size: int = 256, sharding: NamedSharding | None = None,
                        checks: bool = True, tolerance: float = 0.02,
                        surrogates: Sequence[Surrogate] = ()) -> dict[str, Any]:
    """Accuracy clean, under each attack, under a transfer attack from each of ``surrogates``, and under the
    per-example worst case over all of them, at ``epsilon``.

    With ``checks`` it also runs the gradient-masking diagnostics (see :func:`masking_warnings`): the strongest
    attack at a box-filling radius, input-gradient norms, and a repeat of one attack with the same key.
    Returns ``{"epsilon", "n", "accuracy": {name: acc}, "correct": {name: bool array}, "diagnostics",
    "warnings"}``.
    """
    attacks_ = tuple(attacks_ or standard_attacks())
    check_eval_inputs([epsilon], batch_size)
    _check_names(attacks_, surrogates)
    if norm != "linf" and any(s.kind == "square" for s in attacks_):
        raise ConfigError("robust evaluation: the Square attack is L∞ only; drop it for norm l2")
    key = jax.random.PRNGKey(0) if key is None else key
    kw = dict(norm=norm, box=box, batch_size=batch_size, sharding=sharding)
    clean, grad_norms = clean_diagnostics(apply, params, x, y, batch_size=batch_size, sharding=sharding)
    correct = {"clean": clean}
    for spec in attacks_:  # one key for all: PGD-k × R then contains PGD-k as its first restart
        correct[spec.name] = attack_correct(apply, params, x, y, spec, epsilon=epsilon, key=key, **kw)
    for surrogate in surrogates:
        correct[surrogate.name] = transfer_correct(apply, params, x, y, surrogate, epsilon=epsilon, key=key, **kw)
    correct["worst"] = np.logical_and.reduce([correct[k] for k in correct])
    result = {"epsilon": float(epsilon), "norm": norm, "n": int(len(y)), "transfer": [s.name for s in surrogates],
              "accuracy": {k: float(v.mean()) for k, v in correct.items()}, "correct": correct}
    if checks:
        iterative = [s for s in attacks_ if s.kind == "pgd"]
        strongest = max(iterative, key=lambda s: s.steps * s.restarts) if iterative else None
        diag: dict[str, Any] = {
            "zero_grad_fraction": float(np.mean(grad_norms == 0.0)),
            "nonfinite_grad_fraction": float(np.mean(~np.isfinite(grad_norms))),
        }
        if strongest is not None:
            big = large_epsilon(norm, box, x.shape[1:])
            diag["large_epsilon"] = big
            diag["large_epsilon_accuracy"] = float(np.mean(attack_correct(
                apply, params, x, y, strongest, epsilon=big, key=jax.random.fold_in(key, 1000), **kw)))
            again = attack_correct(apply, params, x, y, strongest, epsilon=epsilon, key=key, **kw)
            diag["repeat_mismatch_fraction"] = float(np.mean(again != correct[strongest.name]))
        result["diagnostics"] = diag
        result["warnings"] = masking_warnings(result, attacks_, tolerance=tolerance)
    return result


def _check_names(attacks_: Sequence[AttackSpec], surrogates: Sequence[Surrogate]) -> None:
    names = ["clean", "worst"] + [s.name for s in attacks_] + [s.name for s in surrogates]
    if len(set(names)) != len(names):
        raise ConfigError(f"robust evaluation: attack names must be unique (and not clean/worst), got {names}")


# The masking checks, each with the name its warnings start with ("[name] ...").
GRADIENT_FREE_WINS = "gradient-free-beats-white-box"
SINGLE_STEP_WINS = "single-step-beats-iterative"
UNBOUNDED_NOT_ZERO = "unbounded-attack-not-zero"
ZERO_GRADIENT = "zero-input-gradient"
NONFINITE_GRADIENT = "nonfinite-input-gradient"
NOT_REPRODUCIBLE = "non-reproducible"
NOT_DECREASING = "accuracy-not-decreasing-in-eps"


def _named(check: str, message: str) -> str:
    return f"[{check}] {message}"


def masking_warnings(result: dict[str, Any], attacks_: Sequence[AttackSpec], *, tolerance: float = 0.02,
                     large_epsilon_max: float = 0.05) -> list[str]:
    """Signs that the reported robustness may come from gradient masking rather than from the model, each warning
    starting with its check's name in brackets.

    * ``gradient-free-beats-white-box``: a gradient-free attack (a transfer attack from a surrogate, or Square)
      beats every white-box iterative attack by more than ``tolerance`` (the evaluated model's own gradients should
      be the better guide: noisy, shattered or masked gradients);
    * ``single-step-beats-iterative``: a single-step attack beats an iterative one by more than ``tolerance``
      (iterative attacks include the single step as a special case, so they should be at least as strong);
    * ``unbounded-attack-not-zero``: accuracy at a box-filling radius stays above ``large_epsilon_max`` (any input
      is reachable there);
    * ``zero-input-gradient`` / ``nonfinite-input-gradient``: some examples have zero or non-finite input gradients
      (saturated softmax, non-differentiable layers);
    * ``non-reproducible``: repeating an attack with the same key changes the results (randomness the evaluation
      does not control).

    The curve's check (``accuracy-not-decreasing-in-eps``) is :func:`curve_warnings`.
    """
    acc, diag = result["accuracy"], result.get("diagnostics", {})
    out = []
    single = [s.name for s in attacks_ if s.kind == "fgsm"]
    multi = [s.name for s in attacks_ if s.kind == "pgd"]
    strongest = min(multi, key=lambda m: acc[m], default=None)
    gradient_free = [*result.get("transfer", ()), *(s.name for s in attacks_ if s.kind == "square")]
    for t in gradient_free:
        if strongest is not None and acc[t] + tolerance < acc[strongest]:
            out.append(_named(GRADIENT_FREE_WINS, f"gradient masking? the gradient-free attack {t} ({acc[t]:.3f}) "
                              f"beats the strongest white-box attack {strongest} ({acc[strongest]:.3f}) at "
                              f"eps={result['epsilon']:g}: the model's own gradients mislead the attacks (noisy, "
                              "shattered or masked); the worst case includes it"))
    for s in single:
        for m in multi:
            if acc[s] + tolerance < acc[m]:
                out.append(_named(SINGLE_STEP_WINS, f"gradient masking? single-step {s} ({acc[s]:.3f}) beats "
                                  f"iterative {m} ({acc[m]:.3f}) at eps={result['epsilon']:g}"))
    if diag.get("large_epsilon_accuracy", 0.0) > large_epsilon_max:
        out.append(_named(UNBOUNDED_NOT_ZERO, f"gradient masking? accuracy is still "
                          f"{diag['large_epsilon_accuracy']:.3f} at eps={diag['large_epsilon']:g}, where every input "
                          "in the box is reachable (expected ~0)"))
    if diag.get("zero_grad_fraction", 0.0) > 0:
        out.append(_named(ZERO_GRADIENT, f"gradient masking? {diag['zero_grad_fraction']:.1%} of examples have an "
                          "exactly zero input gradient (saturated softmax or non-differentiable layers); try the CW "
                          "loss or more restarts"))
    if diag.get("nonfinite_grad_fraction", 0.0) > 0:
        out.append(_named(NONFINITE_GRADIENT, f"gradient masking? {diag['nonfinite_grad_fraction']:.1%} of examples "
                          "have a non-finite input gradient"))
    if diag.get("repeat_mismatch_fraction", 0.0) > 0:
        out.append(_named(NOT_REPRODUCIBLE, "non-reproducible: repeating an attack with the same key changed "
                          f"{diag['repeat_mismatch_fraction']:.1%} of the results (randomness in the model at "
                          "inference?)"))
    return out


def curve_warnings(curve: dict[str, Any], *, tolerance: float = 0.02) -> list[str]:
    """``accuracy-not-decreasing-in-eps``: an attack's accuracy rising by more than ``tolerance`` from one ε of an
    :func:`accuracy_curve` to a larger one (a larger ball holds every perturbation of a smaller one, so a working
    attack cannot do worse there)."""
    out = []
    eps = curve["epsilons"]
    for name, accs in curve["per_attack"].items():
        for i in range(1, len(eps)):
            low = min(accs[:i])
            if accs[i] > low + tolerance:
                at = accs[:i].index(low)
                out.append(_named(NOT_DECREASING, f"gradient masking? {name} accuracy rises from {low:.3f} at eps="
                                  f"{eps[at]:g} to {accs[i]:.3f} at eps={eps[i]:g} (a larger ball cannot be safer)"))
                break
    return out


def accuracy_curve(apply: Callable, params: Any, x: np.ndarray, y: np.ndarray, epsilons: Sequence[float], *,
                   norm: str = "linf", box: attacks.Box = (0.0, 1.0), attacks_: Sequence[AttackSpec] | None = None,
                   key: jax.Array | None = None, batch_size: int = 256,
                   sharding: NamedSharding | None = None, surrogates: Sequence[Surrogate] = (),
                   checked: Sequence[float] = ()) -> dict[str, Any]:
    """Worst-case accuracy over ``attacks_`` at each ε (sorted ascending).

    An example broken at a smaller radius is broken at every larger one (the smaller ball lies inside the larger),
    so ``worst`` accumulates failures along ε and is non-increasing by construction; ``per_attack`` keeps each
    attack's raw accuracy at each ε. At each ε of ``checked`` (added to the curve when missing) the masking checks
    run too and ``results[f"{ε:g}"]`` holds that evaluation (as :func:`evaluate_robustness` returns it, less the
    per-example arrays), its ``worst`` the curve's there: the minimum over every attack at that and every smaller ε.
    """
    attacks_ = tuple(attacks_ or standard_attacks())
    key = jax.random.PRNGKey(0) if key is None else key
    check_eval_inputs(list(epsilons) + list(checked), batch_size)
    checked = {float(e) for e in checked}
    eps = sorted({float(e) for e in epsilons} | checked)
    alive = np.ones(len(y), bool)
    names = [s.name for s in attacks_] + [s.name for s in surrogates]
    worst, per_attack, results = [], {name: [] for name in names}, {}
    for e in eps:
        r = evaluate_robustness(apply, params, x, y, epsilon=e, norm=norm, box=box, attacks_=attacks_, key=key,
                                batch_size=batch_size, sharding=sharding, checks=e in checked, surrogates=surrogates)
        alive &= r.pop("correct")["worst"]
        worst.append(float(alive.mean()))
        for name in names:
            per_attack[name].append(r["accuracy"][name])
        if e in checked:
            r["accuracy"]["worst"] = worst[-1]
            results[f"{e:g}"] = r
    return {"epsilons": eps, "norm": norm, "worst": worst, "per_attack": per_attack, "results": results}


def save_curve_png(curves: dict[str, dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Plots worst-case accuracy vs ε for several models (``{label: accuracy_curve(...)}``), written atomically."""
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(6, 4.2))
    ax = fig.subplots()
    for label, curve in curves.items():
        ax.plot(curve["epsilons"], curve["worst"], marker="o", label=label)
    norm = next(iter(curves.values()))["norm"] if curves else "linf"
    ax.set_xlabel(f"ε ({'L∞' if norm == 'linf' else 'L2'}, inputs in [0, 1])")
    ax.set_ylabel("accuracy (worst case over attacks)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    tracking.save_figure_atomic(fig, path, dpi=120)
