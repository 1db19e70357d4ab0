"""Adversarial attacks in raw input space: FGSM/FGM and PGD (random start, restarts), L∞ and L2, and the
gradient-free Square attack (L∞).

The threat model is a norm (``"linf"`` or ``"l2"``), a radius ε and an input box (``(lo, hi)``, or ``None`` for
no box). For this project's images the box is [0, 1] (:mod:`lepton_jax.data.transforms`); any normalisation
belongs inside the model, so ε is always measured in the units the model receives.

Everything here is a pure, jittable function of explicit arrays and PRNG keys. Attacks call the model in inference
mode, ``apply(params, x, train=False)`` (no dropout, no batch-statistics updates). Step sizes are fractions of ε
(α = ``step_size``·ε), so one setting serves a whole accuracy-vs-ε curve. L2 steps are per example: the input
gradient of each example is normalised to unit L2 norm and scaled by α. Per-example losses are summed, not
averaged, so an example's gradient does not depend on the batch it shares (or on how that batch is sharded).

PGD keeps, per example, the worst iterate it visited (after each step; the start point itself is not a candidate),
ranked first by success (misclassified, or classified as the target) and then by the attack loss; restarts keep
each example's worst case across restarts. More steps or more restarts with the same key therefore never raise
robust accuracy, and one step of size ε without random start is exactly FGSM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

Box = tuple[float, float] | None
NORMS = ("linf", "l2")
LOSSES = ("ce", "cw")
_TINY = 1e-12


def check_threat(norm: str, loss: str = "ce") -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; use one of {NORMS}")
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; use one of {LOSSES}")


def _flat(v: jax.Array) -> jax.Array:
    return v.reshape(v.shape[0], -1)


def _per_example(v: jax.Array, like: jax.Array) -> jax.Array:
    """Broadcasts a per-example vector ``(N,)`` against an input batch."""
    return v.reshape((v.shape[0],) + (1,) * (like.ndim - 1))


def perturbation_norm(delta: jax.Array, norm: str) -> jax.Array:
    """‖δ‖ per example (L∞ or L2 over all non-batch axes)."""
    flat = _flat(delta)
    return jnp.max(jnp.abs(flat), axis=1) if norm == "linf" else jnp.sqrt(jnp.sum(flat * flat, axis=1))


def ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
    """The steepest-ascent unit step for a norm: sign(g) for L∞, g/‖g‖₂ per example for L2 (0 where g = 0)."""
    if norm == "linf":
        return jnp.sign(grad)
    length = jnp.sqrt(jnp.sum(_flat(grad) ** 2, axis=1))
    return grad / _per_example(jnp.maximum(length, _TINY), grad)


def project(x: jax.Array, x_adv: jax.Array, epsilon: jax.Array | float, norm: str, box: Box) -> jax.Array:
    """Onto the ε-ball around each example, then into the box.

    For L∞ the two clips give the exact projection onto the intersection. For L2 the box clip after the ball
    projection keeps ‖x_adv − x‖ ≤ ε because x itself lies in the box and clipping moves no coordinate away from x.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = optax.projections.projection_linf_ball(delta, epsilon)
    else:
        balled = jax.vmap(optax.projections.projection_l2_ball, in_axes=(0, None))(delta, epsilon)
        delta = jnp.where(epsilon > 0, balled, jnp.zeros_like(delta))  # optax divides 0/0 when ε = 0
    out = x + delta
    if box is not None:
        out = optax.projections.projection_box(out, box[0], box[1])
    return out


def random_start(key: jax.Array, x: jax.Array, epsilon: jax.Array | float, norm: str, box: Box) -> jax.Array:
    """A point drawn uniformly from the ε-ball around each example (then clipped into the box)."""
    if norm == "linf":
        delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * epsilon
    else:
        k_dir, k_rad = jax.random.split(key)
        direction = ascent_direction(jax.random.normal(k_dir, x.shape, x.dtype), "l2")
        dim = _flat(x).shape[1]
        radius = jax.random.uniform(k_rad, (x.shape[0],), x.dtype) ** (1.0 / dim) * epsilon
        delta = direction * _per_example(radius, x)
    return project(x, x + delta, epsilon, norm, box)


def attack_objective(loss: str, labels: jax.Array, targets: jax.Array | None = None
                     ) -> Callable[[jax.Array], jax.Array]:
    """Per-example value the attack maximises. Untargeted: CE(y) or the CW margin max_{j≠y} z_j − z_y.
    Targeted (``targets`` given): −CE(t) or z_t − max_{j≠t} z_j."""
    goal = labels if targets is None else targets
    sign = 1.0 if targets is None else -1.0

    def objective(logits: jax.Array) -> jax.Array:
        if loss == "ce":
            return sign * optax.softmax_cross_entropy_with_integer_labels(logits, goal)
        own = jnp.take_along_axis(logits, goal[:, None], axis=1)[:, 0]
        others = jnp.max(jnp.where(jax.nn.one_hot(goal, logits.shape[-1], dtype=bool), -jnp.inf, logits), axis=1)
        return sign * (others - own)

    return objective


def attack_success(labels: jax.Array, targets: jax.Array | None = None) -> Callable[[jax.Array], jax.Array]:
    """Per-example success: misclassified (untargeted) or classified as the target."""
    if targets is None:
        return lambda logits: jnp.argmax(logits, -1) != labels
    return lambda logits: jnp.argmax(logits, -1) == targets


def perturb(logits_fn: Callable[[jax.Array], jax.Array], objective: Callable[[jax.Array], jax.Array],
            x: jax.Array, start: jax.Array, *, epsilon: jax.Array | float, norm: str, box: Box,
            steps: int | jax.Array, step_size: float | jax.Array,
            success: Callable[[jax.Array], jax.Array] | None = None
            ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Projected steepest ascent on ``objective(logits_fn(x'))`` from ``start``: ``steps`` steps of α = step_size·ε.

    Without ``success`` the last iterate is returned (training). With it, each example's worst iterate after a
    step is returned, ranked by (success, objective), together with its objective and success flags.
    """
    alpha = step_size * epsilon

    def value_and_grad(xa):
        def total(z):
            logits = logits_fn(z)
            values = objective(logits)
            return jnp.sum(values), (values, logits)

        (_, (values, logits)), grad = jax.value_and_grad(total, has_aux=True)(xa)
        return values, logits, grad

    def ascend(xa, grad):
        return project(x, xa + alpha * ascent_direction(grad, norm), epsilon, norm, box)

    if success is None:
        return jax.lax.fori_loop(0, steps, lambda _, xa: ascend(xa, value_and_grad(xa)[2]), start), None, None

    def keep_worse(best, xa, values, logits, valid):
        best_x, best_v, best_s = best
        s = success(logits)
        better = valid & ((s & ~best_s) | ((s == best_s) & (values > best_v)))
        return (jnp.where(_per_example(better, x), xa, best_x), jnp.where(better, values, best_v),
                jnp.where(better, s, best_s))

    def body(t, carry):
        xa, best = carry
        values, logits, grad = value_and_grad(xa)
        best = keep_worse(best, xa, values, logits, t > 0)  # iterate t (the start at t = 0 is not a candidate)
        return ascend(xa, grad), best

    n = x.shape[0]
    init = (start, jnp.full((n,), -jnp.inf, x.dtype), jnp.zeros((n,), bool))
    xa, best = jax.lax.fori_loop(0, steps, body, (start, init))
    logits = logits_fn(xa)
    return keep_worse(best, xa, objective(logits), logits, jnp.asarray(steps) > 0)


def fgsm(apply: Callable[..., jax.Array], params: Any, x: jax.Array, labels: jax.Array, *,
         epsilon: jax.Array | float, norm: str = "linf", box: Box = (0.0, 1.0), loss: str = "ce",
         targets: jax.Array | None = None) -> jax.Array:
    """FGSM (L∞, Goodfellow et al. 2015) / FGM (L2): one step of size ε along the input gradient's ascent
    direction from the clean point, then into the box."""
    check_threat(norm, loss)
    logits_fn = _inference(apply, params)
    objective = attack_objective(loss, labels, targets)
    x_adv, _, _ = perturb(logits_fn, objective, x, x, epsilon=epsilon, norm=norm, box=box, steps=1,
                          step_size=1.0)
    return x_adv


def pgd(apply: Callable[..., jax.Array], params: Any, x: jax.Array, labels: jax.Array, key: jax.Array, *,
        epsilon: jax.Array | float, norm: str = "linf", box: Box = (0.0, 1.0), steps: int | jax.Array = 10,
        step_size: float | jax.Array = 0.25, random_init: bool = True, restarts: int | jax.Array = 1, loss: str = "ce",
        targets: jax.Array | None = None, keep_best: bool = True) -> jax.Array:
    """PGD (Madry et al. 2018): ``restarts`` runs of ``steps`` projected steps of α = step_size·ε, each from a
    uniform random point of the ε-ball (``random_init``) or from x. Restart r uses ``fold_in(key, r)``.

    ``keep_best`` (required for restarts > 1) returns each example's worst iterate over steps and restarts;
    without it the last iterate of the single run is returned (what adversarial training uses). ``steps``,
    ``restarts`` and ``step_size`` may be traced values, so one compilation serves many settings.
    """
    check_threat(norm, loss)
    if isinstance(restarts, int) and restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if not keep_best and not (isinstance(restarts, int) and restarts == 1):
        raise ValueError("restarts > 1 keeps each example's worst case and needs keep_best=True")
    logits_fn = _inference(apply, params)
    objective = attack_objective(loss, labels, targets)
    success = attack_success(labels, targets) if keep_best else None

    def run(r):
        k = jax.random.fold_in(key, r)
        start = random_start(k, x, epsilon, norm, box) if random_init else x
        return perturb(logits_fn, objective, x, start, epsilon=epsilon, norm=norm, box=box, steps=steps,
                       step_size=step_size, success=success)

    if not keep_best:
        return run(0)[0]

    def merge(r, best):
        bx, bv, bs = best
        xa, v, s = run(r)
        better = (s & ~bs) | ((s == bs) & (v > bv))
        return jnp.where(_per_example(better, x), xa, bx), jnp.where(better, v, bv), jnp.where(better, s, bs)

    return jax.lax.fori_loop(1, restarts, merge, run(0))[0]


_SQUARE_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # per 10,000 queries (the paper's)


def square_linf(apply: Callable[..., jax.Array], params: Any, x: jax.Array, labels: jax.Array, key: jax.Array, *,
                epsilon: jax.Array | float, box: Box = (0.0, 1.0), queries: int | jax.Array = 300,
                p_init: float = 0.1) -> jax.Array:
    """The Square attack (Andriushchenko et al. 2020), L∞, untargeted: random search with the CW margin that uses
    only the model's outputs (no gradients), so noisy, shattered or masked gradients do not stop it.

    It starts from vertical stripes of ±ε and, per query, redraws one random square window (all channels) of the
    perturbation as ±ε, keeping the change where it raises the margin loss of an example not yet misclassified.
    The window covers a fraction ``p`` of the pixels, halved on the paper's schedule (scaled to ``queries``).
    Inputs ``(N, H, W, C)``, ``(N, H, W)`` or ``(N, F)`` (treated as an F × 1 image).
    """
    shape = x.shape
    img = x.reshape(shape[0], shape[1], shape[2] if x.ndim > 2 else 1, -1)
    n, h, w, c = img.shape
    objective = attack_objective("cw", labels)

    def loss(z: jax.Array) -> jax.Array:
        return objective(apply(params, z.reshape(shape), train=False))

    def clip(z: jax.Array) -> jax.Array:
        return z if box is None else jnp.clip(z, box[0], box[1])

    k_init, k_loop = jax.random.split(key)
    signs = jax.random.rademacher(k_init, (n, 1, w, c), x.dtype)
    start = clip(img + epsilon * signs)
    queries = jnp.asarray(queries)
    thresholds = jnp.asarray(_SQUARE_SCHEDULE, jnp.float32) * queries / 10_000

    def body(i, carry):
        best, best_loss = carry
        k_row, k_col, k_sign = jax.random.split(jax.random.fold_in(k_loop, i), 3)
        p = p_init * 0.5 ** jnp.sum(i > thresholds)
        size = jnp.clip(jnp.round(jnp.sqrt(p * h * w)), 1, min(h, w)).astype(jnp.int32)
        row = jax.random.randint(k_row, (n, 1), 0, h - size + 1)
        col = jax.random.randint(k_col, (n, 1), 0, w - size + 1)
        rows, cols = jnp.arange(h)[None], jnp.arange(w)[None]
        in_rows = (rows >= row) & (rows < row + size)
        in_cols = (cols >= col) & (cols < col + size)
        window = in_rows[:, :, None, None] & in_cols[:, None, :, None]
        values = epsilon * jax.random.rademacher(k_sign, (n, 1, 1, c), x.dtype)
        candidate = clip(img + jnp.where(window, values, best - img))
        candidate_loss = loss(candidate)
        better = (candidate_loss > best_loss) & (best_loss <= 0)  # stop once an example is misclassified
        return (jnp.where(better[:, None, None, None], candidate, best),
                jnp.where(better, candidate_loss, best_loss))

    best, _ = jax.lax.fori_loop(0, queries, body, (start, loss(start)))
    return best.reshape(shape)


def _inference(apply: Callable[..., jax.Array], params: Any) -> Callable[[jax.Array], jax.Array]:
    return lambda z: apply(params, z, train=False)
