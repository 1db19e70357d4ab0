"""An MLP on scikit-learn's bundled iris table (4 flower measurements in cm, 3 species): the tabular path.

Command:   .venv/bin/lepton-jax lake ingest --lake lake --table iris --source sklearn:iris
           .venv/bin/lepton-jax train --config configs/iris_mlp.py --workdir runs/iris_mlp --lake lake
Runtime:   under half a minute on a 2-core laptop CPU.
Expected:  test accuracy above 0.9 (150 examples, 23 in test: one error moves it by 4 points; measured: see README).

Each feature is scaled to [0, 1] with its own column's min/max, as recorded at ingest (schema ``column_ranges``);
tables whose columns differ by orders of magnitude need it (configs/wine_mlp.py, configs/breast_cancer_mlp.py).
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "digits_cnn")
    config.num_epochs = 60
    config.batch_size = 16
    config.eval_batch_size = 64
    config.data.table = "iris"
    config.model = ml_collections.ConfigDict({"name": "mlp", "hidden": (64, 64), "dropout": 0.1,
                                              "dtype": "float32"})
    config.optim.warmup_steps = 20
    return config
