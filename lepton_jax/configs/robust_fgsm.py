"""FGSM adversarial training (Goodfellow et al. 2015): half clean, half FGSM loss, FGSM step ε.

Command:   .venv/bin/lepton-jax train --config configs/robust_fgsm.py --workdir runs/robust_fgsm --lake lake \
               [--config.robust.epsilon=0.2]
Runtime:   about the standard row's training time (docs/robustness.md's table: 1.03x and 1.01x).
Expected:  robust to FGSM, less so to PGD; at larger ε prone to catastrophic overfitting (FGSM accuracy far above
           PGD accuracy). Measured numbers: docs/robustness.md.
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "robust_standard")
    config.robust.objective = "fgsm"
    return config
