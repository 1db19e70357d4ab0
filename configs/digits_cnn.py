"""The embedded default: a small CNN on scikit-learn's bundled handwritten digits.

Command:   make run
           (= lepton-jax lake ingest --lake lake --source digits --table digits
              lepton-jax train --config configs/digits_cnn.py --workdir runs/digits_cnn --lake lake)
Runtime:   about a minute on a 2-core laptop CPU (measured: see README).
Expected:  test accuracy >= 0.97 (measured: see README), per-class report and confusion matrix in the workdir.
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    return sibling_config(__file__, "base")  # base.py is this job; every key the library reads is listed there
