"""A learning-rate sweep of the default digits CNN.

Command:   .venv/bin/lepton-jax sweep --config configs/digits_cnn_lr_sweep.py --workdir runs/lr_sweep --lake lake
           (add --processes 2 to run two points at once)
Runtime:   about 25 s per point on a 2-core laptop CPU (3 points).
Expected:  runs/lr_sweep/summary.md with one row per learning rate; 3e-3 (the default) is among the best on dev
           (1e-2 ties it on these digits).
"""

from lepton_jax.config import sibling_config


def get_config():
    return sibling_config(__file__, "digits_cnn")


def get_sweep():
    return {"grid": {"optim.lr": [1e-3, 3e-3, 1e-2]}}
