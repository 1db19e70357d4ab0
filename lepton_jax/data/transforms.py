"""Per-batch preprocessing shared by training, evaluation and prediction (one definition, one behaviour).

A table holds one model-input array (``image`` from image sources, ``signal`` from CSV sensor windows, ``features``
from tabular sets) plus the label array. Lake arrays keep raw source values; models see the input array under the
batch key :data:`INPUT`, scaled to [0, 1] with the ``value_range`` in the table's schema, which is also the input box
for adversarial attacks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lepton_jax.errors import ConfigError

INPUT = "input"  # the batch key models read
LABEL = "label"


def input_array(schema: dict[str, Any]) -> str:
    """The name of the table's model-input array: its one array besides the label array."""
    names = [name for name in schema["arrays"] if name != schema["label_array"]]
    if len(names) != 1:
        raise ConfigError(f"a trainable table has exactly one input array besides {schema['label_array']!r}; "
                          f"this one has {names or 'none'}")
    return names[0]


def input_spec(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema entry (``example_shape``, ``dtype``, ``value_range``, ...) of the table's input array."""
    return schema["arrays"][input_array(schema)]


def scale_to_unit(values: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    lo, hi = float(value_range[0]), float(value_range[1])
    scale = hi - lo if hi > lo else 1.0  # a constant input maps to 0 rather than dividing by zero
    return ((np.asarray(values, np.float32) - lo) / scale).astype(np.float32)


def prepare_batch(batch: dict[str, np.ndarray], schema: dict[str, Any]) -> dict[str, np.ndarray]:
    """Raw lake rows -> model inputs: :data:`INPUT` float32 in [0, 1], :data:`LABEL` int32 (when present)."""
    name = input_array(schema)
    out = {INPUT: scale_to_unit(batch[name], schema["arrays"][name]["value_range"])}
    if schema["label_array"] in batch:
        out[LABEL] = batch[schema["label_array"]].astype(np.int32)
    return out
