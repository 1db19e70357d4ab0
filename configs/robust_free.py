"""Free adversarial training (Shafahi et al. 2019): m = 4 replays of each batch, δ updated from the same
backward pass as the weights.

Command:   lepton-jax train --config configs/robust_free.py --workdir runs/robust_free --lake lake \
               [--config.robust.epsilon=0.2]
Runtime:   about 15 s of training on the 2-core CPU.
Expected:  robustness between FGSM-RS and PGD-AT at about the cost of the standard row (docs/robustness.md).

One train step applies m optimizer updates, so the epochs are divided by m (10 -> 3, as in the paper: the same
number of updates as the other rows) and the schedule is constant after warmup: the loop sizes decaying schedules
for one update per step.
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
