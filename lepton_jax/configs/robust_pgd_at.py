"""PGD adversarial training (Madry et al. 2018): CE on PGD-7 examples, random start, α = ε/4.

Command:   .venv/bin/lepton-jax train --config configs/robust_pgd_at.py --workdir runs/robust_pgd_at --lake lake \
               [--config.robust.epsilon=0.2]
Runtime:   about 1.6x the standard row's training time (docs/robustness.md's table: 1.63x).
Expected:  PGD accuracy far above the standard row's and close to TRADES', with clean accuracy kept
           (docs/robustness.md).
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "robust_standard")
    config.robust.objective = "pgd"
    return config
