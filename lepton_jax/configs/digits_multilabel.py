"""Multi-label: the default CNN predicting three attributes of each handwritten digit (even, at least 5, prime).

Command:   .venv/bin/lepton-jax lake ingest --lake lake --table digits_attributes --source sklearn:digits_attributes
           .venv/bin/lepton-jax train --config configs/digits_multilabel.py --workdir runs/digits_multilabel --lake lake
Then:      .venv/bin/lepton-jax eval --workdir runs/digits_multilabel      # per-label report, micro/macro F1, mAP
           .venv/bin/python -c "import numpy as np, sklearn.datasets as d; \
               np.save('x.npy', d.load_digits().images[:5])"                # 5 images, raw 0..16
           .venv/bin/lepton-jax predict --workdir runs/digits_multilabel --input x.npy --output probs.npy  # (5, 3)
           .venv/bin/lepton-jax registry register --lake lake --name attributes --workdir runs/digits_multilabel
           .venv/bin/lepton-jax serve --lake lake --model attributes@1 --port 8000  # probabilities FP32 [N, 3]
           .venv/bin/python -c "import numpy as np; from lepton_jax.serve.client import Client; \
               print(Client('http://127.0.0.1:8000').infer('attributes', np.load('x.npy')))"
           .venv/bin/lepton-jax export --workdir runs/digits_multilabel --output edge/attributes
           .venv/bin/python edge/attributes/edge_runner.py edge/attributes x.npy   # probabilities (and labels)
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
