"""The digits default with a ResNet instead of the CNN (logical axes on every parameter, so FSDP/TP rules apply).

Command:   .venv/bin/lepton-jax train --config configs/digits_resnet.py --workdir runs/digits_resnet --lake lake
           benchmark: .venv/bin/python scripts/bench_train.py --config configs/digits_resnet.py
Runtime:   a few minutes on a 2-core laptop CPU (30 epochs); seconds on a GPU.
Expected:  test accuracy above 0.9 (not tuned; run it and see runs/digits_resnet/summary.json).
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "digits_cnn")
    config.model = ml_collections.ConfigDict({"name": "resnet", "dtype": "float32"})
    config.model.update({"widths": (32, 64), "blocks_per_stage": 2, "groups": 8})
    config.optim.lr = 1e-3
    return config
