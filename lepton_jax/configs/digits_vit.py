"""The digits default with a ViT instead of the CNN (logical axes on every parameter, so FSDP/TP rules apply).

Command:   .venv/bin/lepton-jax train --config configs/digits_vit.py --workdir runs/digits_vit --lake lake
           benchmark: .venv/bin/python scripts/bench_train.py --config configs/digits_vit.py
Runtime:   a few minutes on a 2-core laptop CPU (30 epochs); seconds on a GPU.
Expected:  test accuracy above 0.9 (not tuned; run it and see runs/digits_vit/summary.json).
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "digits_cnn")
    config.model = ml_collections.ConfigDict({"name": "vit", "dtype": "float32"})
    config.model.update({"patch": 2, "width": 64, "depth": 2, "num_heads": 4, "mlp_dim": 128, "dropout": 0.1})
    config.optim.lr = 1e-3
    return config
