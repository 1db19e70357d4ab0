"""Edge training on the embedded digits: DiLoCo over 4 nodes, one sync every 32 steps.

Command:   .venv/bin/lepton-jax train --config configs/edge_diloco.py --workdir runs/edge_diloco --lake lake
           (needs >= 4 devices: on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=4; or across processes:
            .venv/bin/lepton-jax launch --num-processes 2 --devices-per-process 2 -- \
                train --config configs/edge_diloco.py ...)
Runtime:   well under a minute of training on a 2-core CPU.
Expected:  test accuracy within about a point of synchronous data parallel (configs/digits_cnn.py on 4 devices)
           with ~32x fewer collective bytes; see docs/edge.md (scripts/edge_study.py reproduces the table).

Inner optimizer = ``optim`` (AdamW, per node); outer = Nesterov SGD on the averaged parameter delta. FedAvg /
local SGD: ``--config.edge.outer_lr=1.0 --config.edge.outer_momentum=0.0``.
"""

import ml_collections

from lepton_jax.config import sibling_config


def get_config() -> ml_collections.ConfigDict:
    config = sibling_config(__file__, "digits_cnn")
    config.edge.nodes = 4  # replicas, one per device (mesh axis 'nodes'), within or across processes
    config.edge.sync_every = 32  # H: inner steps between syncs
    config.edge.outer_lr = 0.7
    config.edge.outer_momentum = 0.9  # Nesterov; 0 with outer_lr 1.0 = FedAvg / local SGD
    return config
