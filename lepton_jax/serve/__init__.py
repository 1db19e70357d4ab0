"""Inference: predictors restored from run directories (imported lazily: the HTTP codec runs without jax)."""

from typing import Any

__all__ = ["Predictor", "load_npy"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lepton_jax.serve import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
