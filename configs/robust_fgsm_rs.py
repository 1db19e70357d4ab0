"""FGSM-RS, "fast" adversarial training (Wong et al. 2020): uniform random start, one step of 1.25ε.

Command:   lepton-jax train --config configs/robust_fgsm_rs.py --workdir runs/robust_fgsm_rs --lake lake \
               [--config.robust.epsilon=0.2]
Runtime:   about 15 s of training on the 2-core CPU.
Expected:  PGD accuracy close to PGD-AT at a fraction of its cost (docs/robustness.md).
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
    config.robust.objective = "fgsm_rs"
    return config
