"""FGSM-RS, "fast" adversarial training (Wong et al. 2020): uniform random start, one step of 1.25ε.

Command:   .venv/bin/lepton-jax train --config configs/robust_fgsm_rs.py --workdir runs/robust_fgsm_rs --lake lake \
               [--config.robust.epsilon=0.2]
Runtime:   about the standard row's training time (docs/robustness.md's table: 0.96x and 1.08x).
Expected:  PGD accuracy close to PGD-AT at a fraction of its cost (docs/robustness.md).
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "robust_standard")
    config.robust.objective = "fgsm_rs"
    return config
