"""Regression: an MLP on scikit-learn's bundled diabetes table (442 patients, 10 features, disease progression).

Command:   .venv/bin/lepton-jax lake ingest --lake lake --table diabetes --source sklearn:diabetes
           .venv/bin/lepton-jax train --config configs/diabetes_mlp.py --workdir runs/diabetes_mlp --lake lake
Then:      .venv/bin/lepton-jax eval --workdir runs/diabetes_mlp                  # RMSE, MAE, R² on the test split
           .venv/bin/python -c "import numpy as np, sklearn.datasets as d; \
               np.save('x.npy', d.load_diabetes().data[:5].astype('float32'))"   # 5 patients' 10 features
           .venv/bin/lepton-jax predict --workdir runs/diabetes_mlp --input x.npy --output values.npy  # (5, 1)
           .venv/bin/lepton-jax registry register --lake lake --name diabetes --workdir runs/diabetes_mlp
           .venv/bin/lepton-jax serve --lake lake --model diabetes@1 --port 8000   # KServe output: value FP32 [N, 1]
           .venv/bin/python -c "import numpy as np; from lepton_jax.serve.client import Client; \
               print(Client('http://127.0.0.1:8000').infer('diabetes', np.load('x.npy'), input_name='features'))"
           .venv/bin/lepton-jax export --workdir runs/diabetes_mlp --output edge/diabetes   # or --lake/--model
           .venv/bin/python edge/diabetes/edge_runner.py edge/diabetes x.npy            # jax + numpy only
Runtime:   about 2 minutes (measured: 1 min 58 s wall on a 2-core machine shared with other jobs).
Expected:  test RMSE 55.5, MAE 45.3, R² 0.43 (measured with this command, 900 steps); scikit-learn's
           LinearRegression on the same train/test rows: RMSE 55.2, MAE 44.2, R² 0.44.

Task ``regression`` (docs/tasks.md): MSE on targets standardised with the train split's mean/std (recorded in the
run's schema), MAE/RMSE/R² in target units; the best checkpoint is the one with the lowest dev RMSE.
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "iris_mlp")
    config.task.name = "regression"
    config.data.table = "diabetes"
    config.num_epochs = 100
    config.batch_size = 32
    config.model = ml_collections.ConfigDict({"name": "mlp", "hidden": (32,), "dropout": 0.1, "dtype": "float32"})
    config.optim.lr = 1e-3
    config.optim.weight_decay = 1e-3
    config.checkpoint.best_metric = "dev_rmse"
    config.checkpoint.best_mode = "min"
    return config
