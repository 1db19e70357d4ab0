"""Dense targets: a fully convolutional net segmenting the strokes of each handwritten digit (pixel >= 8 of 16).

Command:   .venv/bin/lepton-jax lake ingest --lake lake --table digits_strokes --source sklearn:digits_strokes
           .venv/bin/lepton-jax train --config configs/digits_strokes_fcn.py --workdir runs/strokes --lake lake
Then:      .venv/bin/lepton-jax eval --workdir runs/strokes                  # loss, pixel accuracy, IoU per class
           .venv/bin/python -c "import numpy as np, sklearn.datasets as d; \
               np.save('x.npy', d.load_digits().images[:5])"                # 5 images, raw 0..16
           .venv/bin/lepton-jax predict --workdir runs/strokes --input x.npy --output mask.npy   # (5, 8, 8) 0/1
           .venv/bin/lepton-jax registry register --lake lake --name strokes --workdir runs/strokes
           .venv/bin/lepton-jax serve --lake lake --model strokes@1 --port 8000  # probabilities FP32 [N, 8, 8, 2]
           .venv/bin/python -c "import numpy as np; from lepton_jax.serve.client import Client; \
               print(Client('http://127.0.0.1:8000').infer('strokes', np.load('x.npy'))['probabilities'].shape)"
           .venv/bin/lepton-jax export --workdir runs/strokes --output edge/strokes
           .venv/bin/python edge/strokes/edge_runner.py edge/strokes x.npy      # per-pixel mask, probabilities
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
