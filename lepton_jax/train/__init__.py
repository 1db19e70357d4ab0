"""Training: explicit state, Optax optimizers, jitted steps and the loop.

``from lepton_jax.train import train, Hook, RunContext`` gives the loop's entry point and the hook types; they are
imported on first use, so importing a submodule (``lepton_jax.train.step``, as serving does) does not load the loop.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {"train": "lepton_jax.train.loop", "Hook": "lepton_jax.train.hooks",
            "RunContext": "lepton_jax.train.hooks"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
