"""Training-set augmentation: seeded random transforms of model inputs, declared in the config and applied by a
Grain ``random_map`` in the train pipeline only (evaluation, prediction, serving and export never augment).

``config.augment`` is a tuple of steps, applied in order; a step is a name or a ``(name, {keyword: value})`` pair,
and a name is a shipped augmentation (:data:`AUGMENTATIONS`) or an import path ``package.module:function``
(:mod:`lepton_jax.plugins`)::

    config.augment = (("random_shift", {"max_shift": 1}), ("gaussian_noise", {"std": 0.03}))
    --config.augment="(('random_shift', {'max_shift': 1}), 'brightness')"     # from the command line

An augmentation is a function ``f(x, rng, **params) -> x`` of one example (``x``: float32 of the table's example
shape, already scaled to [0, 1] by :mod:`lepton_jax.data.transforms`) and a ``numpy.random.Generator``. Augmenting
after scaling keeps one set of parameters meaningful for every table (a noise ``std`` of 0.03 is 3 % of the input's
range), and the result is clipped to [0, 1], the input box attacks, range checks and exported artifacts assume.

Randomness: Grain seeds the map with ``config.seed`` and the batch's position in the run (its index across epochs),
and each example's generator is that stream keyed by the example's row in the *global* batch, so augmented batches
are the same for any number of processes, and the iterator's checkpointed position alone restores them: a resumed
run sees exactly the augmented batches an uninterrupted one does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lepton_jax import plugins
from lepton_jax.data.transforms import INPUT
from lepton_jax.errors import ConfigError

Augmentation = Callable[..., np.ndarray]  # f(x, rng, **params) -> x, one example in [0, 1]


def random_shift(x: np.ndarray, rng: np.random.Generator, *, max_shift: int = 1,
                 axes: Sequence[int] = (0, 1)) -> np.ndarray:
    """Translates the example by up to ``max_shift`` positions along each of ``axes``, filling with 0 (the low end of
    the range: a digit's background): a random crop of the example padded by ``max_shift`` (images: rows and columns;
    a sensor window: ``axes=(0,)`` shifts it in time)."""
    offsets = rng.integers(-max_shift, max_shift + 1, size=len(axes))
    src, dst = [slice(None)] * x.ndim, [slice(None)] * x.ndim
    for axis, d in zip(axes, offsets.tolist(), strict=True):
        n = x.shape[axis]
        src[axis], dst[axis] = (slice(0, max(n - d, 0)), slice(d, None)) if d >= 0 else (slice(-d, None),
                                                                                           slice(0, max(n + d, 0)))
    out = np.zeros_like(x)
    out[tuple(dst)] = x[tuple(src)]
    return out


def horizontal_flip(x: np.ndarray, rng: np.random.Generator, *, p: float = 0.5, axis: int = 1) -> np.ndarray:
    """Mirrors ``axis`` (an image's columns) with probability ``p``. Only where a mirror image is the same class:
    photos of objects, not digits or letters."""
    return np.flip(x, axis=axis) if rng.random() < p else x


def brightness(x: np.ndarray, rng: np.random.Generator, *, max_delta: float = 0.1) -> np.ndarray:
    """Adds one offset drawn uniformly from [-max_delta, max_delta] to the whole example."""
    return x + np.float32(rng.uniform(-max_delta, max_delta))


def gaussian_noise(x: np.ndarray, rng: np.random.Generator, *, std: float = 0.03) -> np.ndarray:
    """Adds independent N(0, std²) noise to every value (for sensor windows this is *jitter*)."""
    return x + rng.normal(0.0, std, size=x.shape).astype(np.float32)


def scaling(x: np.ndarray, rng: np.random.Generator, *, std: float = 0.1) -> np.ndarray:
    """Scales each channel (last axis) of a window by a factor drawn from N(1, std²) about the channel's mean over the
    window (magnitude scaling that keeps the window's offset, for sensor windows)."""
    factor = rng.normal(1.0, std, size=x.shape[-1]).astype(np.float32)
    mean = x.mean(axis=tuple(range(x.ndim - 1)), keepdims=True)
    return mean + (x - mean) * factor


AUGMENTATIONS: dict[str, Augmentation] = {"random_shift": random_shift, "horizontal_flip": horizontal_flip,
                                          "brightness": brightness, "gaussian_noise": gaussian_noise,
                                          "jitter": gaussian_noise, "scaling": scaling}


def parse_augment(spec: Any) -> list[tuple[str, Augmentation, dict[str, Any]]]:
    """``config.augment`` -> ``[(name, function, params)]``; a :class:`ConfigError` (one line) for an unknown name, a
    malformed step or a parameter the function does not take."""
    if isinstance(spec, str) or not isinstance(spec, Sequence):
        raise ConfigError(f"augment must be a tuple of steps (names or (name, {{params}}) pairs), got {spec!r}")
    steps = []
    for step in spec:
        name, params = (step, {}) if isinstance(step, str) else (tuple(step) + (None,))[:2]
        if (not isinstance(step, str) and (not isinstance(step, Sequence) or len(step) != 2)) \
                or not isinstance(name, str) or not isinstance(params, dict):
            raise ConfigError(f"augment step {step!r}: write a name or a (name, {{params}}) pair, e.g. "
                              "('random_shift', {'max_shift': 1})")
        if name in AUGMENTATIONS:
            fn = AUGMENTATIONS[name]
        elif plugins.is_import_path(name):
            fn = plugins.load_object(name, "augmentation")
        else:
            raise ConfigError(f"unknown augmentation {name!r}; shipped: {', '.join(AUGMENTATIONS)}, or an import "
                              "path package.module:function")
        try:
            inspect.signature(fn).bind(np.zeros(1, np.float32), np.random.default_rng(0), **params)
        except TypeError as e:
            raise ConfigError(f"augmentation {name!r} does not take {params}: {e}") from e
        steps.append((name, fn, dict(params)))
    return steps


def describe(spec: Any) -> list[dict[str, Any]]:
    """The resolved steps for run.json: ``[{"name": ..., "params": {...}}]`` (params as given; defaults implied)."""
    return [{"name": name, "params": params} for name, _, params in parse_augment(spec)]


class Augment:
    """The batch-level Grain random map: augments each host row of a batch with a generator keyed by the row's
    position in the global batch (see the module docstring). ``rows``: this process's rows of the global batch."""

    def __init__(self, spec: Any, rows: slice):
        self.steps = parse_augment(spec)
        self.rows = rows

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __call__(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        key = rng.integers(0, 2**63, size=2, dtype=np.uint64)  # this batch's stream (Grain: seed, batch index)
        example_rng = np.random.Generator(np.random.Philox(key=key))
        x = batch[INPUT]
        out = np.empty_like(x)
        for i, row in enumerate(range(self.rows.start, self.rows.stop)):
            _reset(example_rng, row)
            example = x[i]
            for _, fn, params in self.steps:
                example = fn(example, example_rng, **params)
            out[i] = np.clip(example, 0.0, 1.0)
        return {**batch, INPUT: out}


def _reset(rng: np.random.Generator, row: int) -> None:
    """Points a Philox generator at the stream of global row ``row`` (counter ``[0, 0, 0, row]``, Grain's way of
    keying one generator by an index without constructing a new one)."""
    state = rng.bit_generator.state
    state["state"]["counter"] = np.array([0, 0, 0, row], dtype=np.uint64)
    state["buffer"] = np.zeros(4, dtype=np.uint64)
    state["buffer_pos"] = 4
    state["has_uint32"] = 0
    state["uinteger"] = 0
    rng.bit_generator.state = state
