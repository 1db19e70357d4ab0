"""FGSM adversarial training (Goodfellow et al. 2015): half clean, half FGSM loss, FGSM step ε.

Command:   lepton-jax train --config configs/robust_fgsm.py --workdir runs/robust_fgsm --lake lake \
               [--config.robust.epsilon=0.2]
Runtime:   about 15 s of training on the 2-core CPU.
Expected:  robust to FGSM, less so to PGD; at larger ε prone to catastrophic overfitting (FGSM accuracy far above
           PGD accuracy). Measured numbers: docs/robustness.md.
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "robust_standard")
    config.robust.objective = "fgsm"
    return config
