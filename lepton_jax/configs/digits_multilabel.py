"""Multi-label: the default CNN predicting three attributes of each handwritten digit (even, at least 5, prime).

Command:   .venv/bin/lepton-jax lake ingest --lake lake --table digits_attributes --source sklearn:digits_attributes
           .venv/bin/lepton-jax train --config configs/digits_multilabel.py --workdir runs/digits_multilabel --lake lake
Runtime:   about 75 s (measured: 1 min 15 s wall, 31 s of training, on a 2-core machine shared with other jobs).
Expected:  test micro-F1 0.967, macro-F1 0.966, mAP 0.997 (measured with this command, 190 steps).

Task ``multilabel`` (docs/tasks.md): sigmoid binary cross-entropy over the multi-hot target; micro/macro F1 and mAP;
the best checkpoint is the one with the highest dev micro-F1.
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "digits_cnn")
    config.task.name = "multilabel"
    config.data.table = "digits_attributes"
    config.num_epochs = 10
    config.checkpoint.best_metric = "dev_micro_f1"
    config.checkpoint.best_mode = "max"
    return config
