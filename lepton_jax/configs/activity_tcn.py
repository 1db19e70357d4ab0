"""A temporal CNN on windows of a CSV accelerometer log (the sensor path: CSV -> lake windows -> 1-D convs).

Command:   .venv/bin/python -m lepton_jax.lake.synthetic data/activity.csv      # or bring your own CSV
           .venv/bin/lepton-jax lake ingest --lake lake --table activity --source csv:data/activity.csv \
               --window 64 --series-column session
           .venv/bin/lepton-jax train --config configs/activity_tcn.py --workdir runs/activity_tcn --lake lake
           (windows do not overlap: with --stride < --window, neighbouring windows would share rows across splits)
Runtime:   well under a minute of training on a 2-core laptop CPU.
Expected:  the synthetic log's three activities are easy to tell apart by rhythm: test accuracy near 1.0
           (measured: see README). A real log needs its own tuning.
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "digits_cnn")
    config.num_epochs = 15
    config.batch_size = 32
    config.data.table = "activity"
    config.model = ml_collections.ConfigDict({"name": "tcn", "features": (16, 32), "kernel_size": 5,
                                              "dropout": 0.1, "dtype": "float32"})
    config.optim.lr = 1e-2
    config.optim.warmup_steps = 20
    return config
