"""The embedded default: a small CNN on scikit-learn's bundled handwritten digits.

Command:   make run
           (= lepton-jax lake ingest --lake lake --source digits --table digits
              lepton-jax train --config configs/digits_cnn.py --workdir runs/digits_cnn --lake lake)
Runtime:   about a minute on a 2-core laptop CPU (measured: see README).
Expected:  test accuracy >= 0.97 (measured: see README), per-class report and confusion matrix in the workdir.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_epochs = 30
    config.batch_size = 64
    config.eval_batch_size = 256
    config.log_every_steps = 10
    config.eval_every_steps = 0  # 0 = once per epoch; every evaluation also writes a checkpoint
    config.grad_accum_steps = 1

    config.data = ml_collections.ConfigDict()
    config.data.lake = "lake"
    config.data.table = "digits"
    config.data.version = 0  # 0 = latest committed version

    config.model = ml_collections.ConfigDict()
    config.model.name = "cnn"
    config.model.features = (32, 64)
    config.model.hidden = 128
    config.model.dropout = 0.25
    config.model.dtype = "float32"  # compute dtype: "bfloat16" for mixed precision (parameters stay float32)

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adamw"
    config.optim.lr = 3e-3
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = 50
    config.optim.weight_decay = 1e-4
    config.optim.decay = "decoupled"
    config.optim.clip_norm = 1.0

    config.mesh = ml_collections.ConfigDict()
    config.mesh.axes = {"data": -1}
    config.mesh.num_devices = -1  # -1 = all devices
    config.mesh.dcn_axes = {}  # multi-host: sizes across hosts; then mesh.axes are the sizes within a host

    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = "dp"  # a preset (dp, fsdp, fsdp_tp) or a list of (logical axis, mesh axis) pairs
    config.sharding.min_size = 1024  # parameters with fewer elements stay replicated

    config.profile_start_step = 0  # with profile_steps > 0: trace that many steps from this one into workdir/profile
    config.profile_steps = 0

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.max_to_keep = 2
    return config
