"""FGSM adversarial training (Goodfellow et al. 2015): half clean, half FGSM loss, FGSM step ε.

Command:   lepton-jax train --config configs/robust_fgsm.py --workdir runs/robust_fgsm --lake lake \
               [--config.robust.epsilon=0.2]
Runtime:   about 15 s of training on the 2-core CPU.
Expected:  robust to FGSM, less so to PGD; at larger ε prone to catastrophic overfitting (FGSM accuracy far above
           PGD accuracy). Measured numbers: docs/robustness.md.
"""

import importlib.util
from pathlib import Path

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("lepton_config_robust_standard",
                                                  Path(__file__).with_name("robust_standard.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.robust.objective = "fgsm"
    return config
