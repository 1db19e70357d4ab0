"""Metrics and evaluation: accuracy, classification reports, confusion matrices."""

from lepton_jax.eval.metrics import classification_summary, evaluate_split, save_confusion_matrix

__all__ = ["classification_summary", "evaluate_split", "save_confusion_matrix"]
