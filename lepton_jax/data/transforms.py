"""Per-batch preprocessing shared by training, evaluation and prediction (one definition, one behaviour).

Lake arrays keep raw source values; models see images scaled to [0, 1] using the ``value_range`` in the table's
schema, which is also the input box for adversarial attacks.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def scale_to_unit(images: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    lo, hi = float(value_range[0]), float(value_range[1])
    return ((np.asarray(images, np.float32) - lo) / (hi - lo)).astype(np.float32)


def prepare_batch(batch: dict[str, np.ndarray], schema: dict[str, Any]) -> dict[str, np.ndarray]:
    """Raw lake rows -> model inputs: ``image`` float32 in [0, 1], ``label`` int32."""
    out = {"image": scale_to_unit(batch["image"], schema["arrays"]["image"]["value_range"])}
    if schema["label_array"] in batch:
        out["label"] = batch[schema["label_array"]].astype(np.int32)
    return out
