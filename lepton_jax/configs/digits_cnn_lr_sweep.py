"""A learning-rate sweep of the default digits CNN.

Command:   .venv/bin/lepton-jax sweep --config configs/digits_cnn_lr_sweep.py --workdir runs/lr_sweep --lake lake
           (add --processes 2 to run two points at once)
Runtime:   measured 228 s for the 3 points on a 2-core CPU shared with other jobs.
Expected:  runs/lr_sweep/summary.md with one row per learning rate. Measured (seed 0), lr 1e-3 / 3e-3 (the default) /
           1e-2: best dev accuracy 0.9851 / 0.9926 / 1.0000, test accuracy 0.9705 / 0.9742 / 0.9815; 1e-2 is the best
           of the three here (2 of 269 dev examples over the default), one seed.
"""

from lepton_jax.config import sibling_config


def get_config():
    return sibling_config(__file__, "digits_cnn")


def get_sweep():
    return {"grid": {"optim.lr": [1e-3, 3e-3, 1e-2]}}
