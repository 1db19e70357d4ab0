"""An MLP on scikit-learn's bundled breast_cancer table: the tabular path with per-column scaling.

Command:   .venv/bin/lepton-jax lake ingest --lake lake --table breast_cancer --source sklearn:breast_cancer
           .venv/bin/lepton-jax train --config configs/breast_cancer_mlp.py --workdir runs/breast_cancer_mlp --lake lake
           (or .venv/bin/python scripts/tabular_baselines.py: both tables, beside a logistic regression)
Runtime:   under a minute on a 2-core laptop CPU.
Expected:  test accuracy at least scikit-learn's standardised LogisticRegression on the same split (measured: see
           README).

The columns differ by orders of magnitude, so the table records one range per column at ingest
(schema ``column_ranges``) and every column is scaled to [0, 1] with its own range (lepton_jax.data.transforms).
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "iris_mlp")
    config.data.table = "breast_cancer"
    # chosen by best dev accuracy (seeds 0-2) among 60/100 epochs, dropout 0.1/0.3, hidden (64, 64)/(32,),
    # weight decay 1e-4/1e-2
    config.num_epochs = 100
    config.optim.weight_decay = 1e-2
    return config
