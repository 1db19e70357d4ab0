"""A learning-rate sweep of the default digits CNN.

Command:   .venv/bin/lepton-jax sweep --config configs/digits_cnn_lr_sweep.py --workdir runs/lr_sweep --lake lake
           (add --processes 2 to run two points at once)
Runtime:   about 25 s per point on a 2-core laptop CPU (3 points).
Expected:  runs/lr_sweep/summary.md with one row per learning rate; 3e-3 (the default) is best on dev.
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("digits_cnn", Path(__file__).with_name("digits_cnn.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    return _base.get_config()


def get_sweep():
    return {"grid": {"optim.lr": [1e-3, 3e-3, 1e-2]}}
