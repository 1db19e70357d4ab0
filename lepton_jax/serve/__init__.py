"""Inference: predictors restored from run directories."""

from lepton_jax.serve.predictor import Predictor, load_npy

__all__ = ["Predictor", "load_npy"]
