"""Evaluation over a lake split and the classification report (precision, recall, F1, support per class)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from sklearn import metrics as skm
from tqdm.auto import tqdm

from lepton_jax import tracking
from lepton_jax.data import LakeDataSource, eval_batches, to_global
from lepton_jax.data.transforms import INPUT, LABEL


def evaluate_split(predict: Callable, params: Any, source: LakeDataSource, *, schema: dict[str, Any],
                   global_batch_size: int, sharding: NamedSharding, progress: bool = False) -> dict[str, np.ndarray]:
    """Logits and labels for every example of a split, in order (padding removed)."""
    logits, labels = [], []
    batches = eval_batches(source, global_batch_size=global_batch_size, schema=schema)
    total = -(-len(source) // global_batch_size)
    for batch, n_valid in tqdm(batches, total=total, desc=f"eval {source.reader.split}", unit="batch",
                               disable=not progress or jax.process_index() != 0, leave=False):
        out = predict(params, to_global({INPUT: batch[INPUT]}, sharding)[INPUT])
        logits.append(np.asarray(multihost_utils.process_allgather(out, tiled=True))[:n_valid])
        labels.append(np.asarray(multihost_utils.process_allgather(
            to_global({LABEL: batch[LABEL]}, sharding)[LABEL], tiled=True))[:n_valid])
    logits_, labels_ = np.concatenate(logits), np.concatenate(labels)
    return {"logits": logits_, "labels": labels_}


def summary_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return {"loss": float(jax.device_get(loss)), "accuracy": float(np.mean(logits.argmax(-1) == labels))}


def classification_summary(labels: np.ndarray, predictions: np.ndarray, label_names: list[str]
                           ) -> dict[str, Any]:
    """Accuracy, scikit-learn's per-class report (text and dict) and the confusion matrix."""
    classes = list(range(len(label_names)))
    return {
        "accuracy": float(np.mean(predictions == labels)),
        "report_text": skm.classification_report(labels, predictions, labels=classes, target_names=label_names,
                                                 digits=4, zero_division=0),
        "report": skm.classification_report(labels, predictions, labels=classes, target_names=label_names,
                                            output_dict=True, zero_division=0),
        "confusion_matrix": skm.confusion_matrix(labels, predictions, labels=classes).tolist(),
    }


def save_confusion_matrix(matrix: list[list[int]], label_names: list[str], path: Path, title: str = "") -> None:
    """Writes the confusion matrix as a PNG (atomically)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5.5))
    ax = fig.subplots()
    skm.ConfusionMatrixDisplay(np.asarray(matrix), display_labels=label_names).plot(ax=ax, colorbar=False,
                                                                                     cmap="Blues")
    ax.set_title(title)
    fig.tight_layout()
    tracking.save_figure_atomic(fig, path, dpi=120)
