"""FGSM-RS, "fast" adversarial training (Wong et al. 2020): uniform random start, one step of 1.25ε.

Command:   lepton-jax train --config configs/robust_fgsm_rs.py --workdir runs/robust_fgsm_rs --lake lake \
               [--config.robust.epsilon=0.2]
Runtime:   about 15 s of training on the 2-core CPU.
Expected:  PGD accuracy close to PGD-AT at a fraction of its cost (docs/robustness.md).
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "robust_standard")
    config.robust.objective = "fgsm_rs"
    return config
