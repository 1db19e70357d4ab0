"""Dense targets: a fully convolutional net segmenting the strokes of each handwritten digit (pixel >= 8 of 16).

Command:   .venv/bin/lepton-jax lake ingest --lake lake --table digits_strokes --source sklearn:digits_strokes
           .venv/bin/lepton-jax train --config configs/digits_strokes_fcn.py --workdir runs/strokes --lake lake
Runtime:   under a minute (measured: 44 s wall, 14 s of training, on a 2-core machine shared with other jobs).
Expected:  test mean IoU 0.947, pixel accuracy 0.976 (measured with this command, 95 steps).

Task ``dense`` (docs/tasks.md): per-pixel cross-entropy; pixel accuracy and mean IoU; the best checkpoint is the one
with the highest dev mean IoU.
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "digits_cnn")
    config.task.name = "dense"
    config.data.table = "digits_strokes"
    config.num_epochs = 5
    config.model = ml_collections.ConfigDict({"name": "fcn", "features": (16, 16), "dtype": "float32"})
    config.checkpoint.best_metric = "dev_mean_iou"
    config.checkpoint.best_mode = "max"
    return config
