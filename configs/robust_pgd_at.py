"""PGD adversarial training (Madry et al. 2018): CE on PGD-7 examples, random start, α = ε/4.

Command:   lepton-jax train --config configs/robust_pgd_at.py --workdir runs/robust_pgd_at --lake lake \
               [--config.robust.epsilon=0.2]
Runtime:   about 40 s of training on the 2-core CPU (~4x the standard row).
Expected:  the highest PGD accuracy of the table at a small cost in clean accuracy (docs/robustness.md).
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
    config.robust.objective = "pgd"
    return config
