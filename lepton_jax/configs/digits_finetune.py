"""Fine-tuning: the digits CNN starting from the registry's production model instead of random parameters.

Commands:  lepton-jax lake ingest --lake lake --source digits --table digits
           lepton-jax train --config configs/digits_cnn.py --workdir runs/digits_cnn --lake lake
           lepton-jax registry register --lake lake --name digits --workdir runs/digits_cnn --promote production
           (new data for the table, e.g. `lepton-jax lake ingest ... --table digits --mode append`)
           lepton-jax train --config configs/digits_finetune.py --workdir runs/digits_finetune --lake lake
           lepton-jax registry register --lake lake --name digits --workdir runs/digits_finetune
Variants:  a changed label set: --config.data.table=<table> --config.init.reinit="('head/.*',)" (the classifier head
           keeps its fresh initialisation); a frozen backbone: --config.optim.freeze="('convs/.*',)"; a smaller
           learning rate for the backbone only: --config.optim.lr_multipliers="(('convs/.*', 0.1),)".
Runtime:   seconds on a 2-core laptop CPU (5 epochs).
Expected:  run.json, summary.json and the registry record name the parent (digits@N from digits@production) and
           both table versions (lineage); benchmark: scripts/bench_finetune.py (docs/finetune.md).
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "digits_cnn")
    config.init.source = "registry"
    config.init.ref = "digits@production"  # in the training lake (init.lake = "")
    config.num_epochs = 5
    config.optim.lr = 1e-3  # a third of the from-scratch rate: start near the parent, move less
    config.optim.warmup_steps = 0
    return config
