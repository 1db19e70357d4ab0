"""Baseline row of the robustness table: the digits CNN trained normally, with the ``robust`` section present.

Command:   .venv/bin/lepton-jax train --config configs/robust_standard.py --workdir runs/robust_standard --lake lake
           (all rows: .venv/bin/python scripts/robust_table.py, see docs/robustness.md)
Runtime:   about 10 s of training on the 2-core CPU.
Expected:  clean test accuracy ~0.97; PGD-20 accuracy ~0.6 at L∞ ε = 0.1 and ~0.04 at ε = 0.2 (docs/robustness.md;
           train prints the clean accuracy, `.venv/bin/lepton-jax robust-eval --workdir runs/robust_standard
           --epsilons 0.1 0.2` the attacked ones).

The other ``configs/robust_*.py`` files start from this one and change ``robust.objective`` (adversarial training
is that one switch on any model). ε is in the model's input units: images scaled to [0, 1].
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "digits_cnn")
    config.num_epochs = 10
    config.robust.update({"objective": "standard", "norm": "linf", "epsilon": 0.1})
    # keep the checkpoint with the best dev PGD accuracy (a step flagged for catastrophic overfitting never is)
    config.checkpoint.best_metric = "dev_pgd_accuracy"
    return config
