"""Regression on sensor windows: the temporal CNN estimating walking/running speed from the synthetic accelerometer log.

Command:   .venv/bin/python -m lepton_jax.lake.synthetic data/activity_speed.csv --speed   # adds a 'speed' column
           .venv/bin/lepton-jax lake ingest --lake lake --table activity_speed \
               --source csv:data/activity_speed.csv --window 64 --series-column session --target-column speed
           .venv/bin/lepton-jax train --config configs/activity_speed_tcn.py --workdir runs/activity_speed --lake lake
Then:      .venv/bin/lepton-jax eval --workdir runs/activity_speed        # RMSE, MAE, R² in m/s on the test split
Runtime:   about a minute (measured: 53 s wall, 18 s of training, 165 steps, on a 2-core machine shared with
           other jobs, load average about 9).
Expected:  test RMSE 0.260 m/s, MAE 0.233, R² 0.965 (measured with these commands, seed 0). For scale, on the same
           test windows: predicting the train split's mean speed of each window's true activity (what a perfect
           classifier knows) gives RMSE 0.457, R² 0.890; the overall mean speed gives RMSE 1.380, R² 0.00.

Each 64-row window (1.28 s at 50 Hz) of the three accelerometer axes is one example; its target is the window's mean
``speed`` (m/s; ``--target-column speed``, docs/tasks.md), its class label the activity (splits stay stratified by
activity). Task ``regression``: MSE on the standardised speed; the best checkpoint has the lowest dev RMSE.
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "activity_tcn")
    config.task.name = "regression"
    config.data.table = "activity_speed"
    config.checkpoint.best_metric = "dev_rmse"
    config.checkpoint.best_mode = "min"
    return config
