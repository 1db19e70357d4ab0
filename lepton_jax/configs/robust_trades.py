"""TRADES (Zhang et al. 2019): CE(x) + β·KL(p(x) ‖ p(x_adv)), x_adv by PGD-7 on the KL, β = 6.

Command:   .venv/bin/lepton-jax train --config configs/robust_trades.py --workdir runs/robust_trades --lake lake \
               [--config.robust.epsilon=0.2]
Runtime:   about 1.8x the standard row's training time (docs/robustness.md's table: 1.79x and 1.78x).
Expected:  PGD accuracy comparable to PGD-AT, trading clean accuracy for robustness via β (docs/robustness.md).
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "robust_standard")
    config.robust.objective = "trades"
    config.robust.trades_beta = 6.0
    return config
