"""PGD adversarial training (Madry et al. 2018): CE on PGD-7 examples, random start, α = ε/4.

Command:   lepton-jax train --config configs/robust_pgd_at.py --workdir runs/robust_pgd_at --lake lake \
               [--config.robust.epsilon=0.2]
Runtime:   about 40 s of training on the 2-core CPU (~4x the standard row).
Expected:  the highest PGD accuracy of the table at a small cost in clean accuracy (docs/robustness.md).
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "robust_standard")
    config.robust.objective = "pgd"
    return config
