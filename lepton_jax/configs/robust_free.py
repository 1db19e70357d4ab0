"""Free adversarial training (Shafahi et al. 2019): m = 4 replays of each batch, δ updated from the same
backward pass as the weights.

Command:   .venv/bin/lepton-jax train --config configs/robust_free.py --workdir runs/robust_free --lake lake \
               [--config.robust.epsilon=0.2]
Runtime:   about 4x the standard row's training time (docs/robustness.md's table: 4.35x and 4.43x).
Expected:  well above the standard row's robustness; on these digits below FGSM-RS and PGD-AT
           (docs/robustness.md).

One train step applies m optimizer updates, so the epochs are divided by m as in the paper, rounded up: 3 epochs
× m = 4 replays make 12 epochs' worth of optimizer updates, 1.2× the 10 of the other rows (2 epochs would make 8).
Learning-rate schedules count optimizer updates (steps × m), so warmup_steps = 200 means 200 updates (50 steps);
the rate is constant after warmup, as in the paper.
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "robust_standard")
    config.robust.objective = "free"
    config.robust.free_replays = 4
    config.num_epochs = 3
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 200
    return config
