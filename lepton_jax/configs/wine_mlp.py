"""An MLP on scikit-learn's bundled wine table: the tabular path with per-column scaling.

Command:   .venv/bin/lepton-jax lake ingest --lake lake --table wine --source sklearn:wine
           .venv/bin/lepton-jax train --config configs/wine_mlp.py --workdir runs/wine_mlp --lake lake
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
    config.data.table = "wine"
    return config
