"""The embedded default: a small CNN on scikit-learn's bundled handwritten digits.

Command:   make run
           (= lepton-jax lake ingest --lake lake --source digits --table digits
              lepton-jax train --config configs/digits_cnn.py --workdir runs/digits_cnn --lake lake)
Runtime:   about a minute on a 2-core laptop CPU (measured: see README).
Expected:  test accuracy >= 0.97 (measured: see README), per-class report and confusion matrix in the workdir.

This file is also the complete base config: it holds every key the library reads, with its default. Other configs
start from it (``sibling_config(__file__, "digits_cnn")``) or from a sibling that does, and override what they
change; command-line overrides must name a key that exists here. Variants (big_vision style):
``--config configs/<name>.py:arg`` passes ``arg`` to ``get_config(arg)`` (this file ignores it).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    from lepton_jax.robust.objectives import default_robust_config

    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_epochs = 30
    config.batch_size = 64  # global batch (all devices, all processes; edge: nodes x per-node rows)
    config.eval_batch_size = 256
    config.log_every_steps = 10
    config.eval_every_steps = 0  # 0 = once per epoch; every evaluation also writes a checkpoint
    config.grad_accum_steps = 1  # micro-batches per step; gradients are reduced across devices once per step
    config.prefetch = 2  # batches prepared ahead of the step in a background thread (0 = off)
    # train-split augmentation, in order: names or (name, {params}) pairs, e.g. (("random_shift", {"max_shift": 1}),
    # ("gaussian_noise", {"std": 0.03})); shipped: random_shift, horizontal_flip, brightness, gaussian_noise/jitter,
    # scaling, or package.module:function (lepton_jax/data/augment.py)
    config.augment = ()

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

    config.task = ml_collections.ConfigDict()  # what is learned (docs/tasks.md)
    config.task.name = "classification"  # classification | regression | multilabel | dense | package.module:Task

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adamw"  # adamw | sgd
    config.optim.lr = 3e-3
    config.optim.schedule = "cosine"  # constant | cosine | linear
    config.optim.warmup_steps = 50
    config.optim.final_lr_frac = 0.0  # cosine/linear: final lr as a fraction of lr
    config.optim.weight_decay = 1e-4
    config.optim.decay = "decoupled"  # decoupled (AdamW/SGDW) | coupled (L2 through the optimizer)
    config.optim.clip_norm = 1.0  # 0 = off
    config.optim.b1 = 0.9  # adamw
    config.optim.b2 = 0.999
    config.optim.momentum = 0.0  # sgd
    config.optim.nesterov = False
    # parameter groups (regexes matched in full against '/'-joined parameter paths, e.g. 'convs/0/kernel', 'head/.*')
    config.optim.freeze = ()  # parameters never updated (bit-identical after training, weight decay included)
    config.optim.lr_multipliers = ()  # ((pattern, multiplier > 0), ...): scaled learning rate; first match wins

    config.init = ml_collections.ConfigDict()  # starting parameters (docs/finetune.md)
    config.init.source = "none"  # none (random) | registry (a registered model version) | run (a run's checkpoint)
    config.init.lake = ""  # registry: the lake holding the model ("" = the training lake)
    config.init.ref = ""  # registry: NAME@STAGE or NAME@VERSION, e.g. digits@production
    config.init.workdir = ""  # run: a training run directory
    config.init.checkpoint = "best"  # run: best | latest
    config.init.reinit = ()  # regexes of parameters kept at their fresh random init, e.g. ('head/.*',) for new classes

    config.mesh = ml_collections.ConfigDict()
    config.mesh.axes = {"data": -1}  # names among data, fsdp, tensor, nodes; one size may be -1 (the rest)
    config.mesh.num_devices = -1  # -1 = all devices
    config.mesh.dcn_axes = {}  # multi-host: sizes across hosts; then mesh.axes are the sizes within a host

    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = "dp"  # a preset (dp, fsdp, fsdp_tp) or a list of (logical axis, mesh axis) pairs
    config.sharding.min_size = 1024  # parameters with fewer elements stay replicated

    config.profile_start_step = 0  # with profile_steps > 0: trace that many steps from this one into workdir/profile
    config.profile_steps = 0

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.keep_latest = 2  # the latest N steps always stay on disk (resume picks the latest)
    config.checkpoint.keep_best = 1  # plus the best K by best_metric (kept independently of the latest N)
    config.checkpoint.best_metric = "dev_accuracy"  # any metric logged at evaluation (robust: dev_pgd_accuracy)
    config.checkpoint.best_mode = "max"  # max | min
    # one process: a save costs the loop a device copy of the state, and Orbax writes it from a background thread;
    # False: the loop waits for Orbax's blocking part instead (no extra device memory for a very large state)
    config.checkpoint.background_copy = True

    config.edge = ml_collections.ConfigDict()  # edge training (local SGD / DiLoCo) when nodes > 1
    config.edge.nodes = 1  # replicas, one per device (mesh axis 'nodes'), within or across processes; 1 = off
    config.edge.sync_every = 32  # H: inner steps between syncs
    config.edge.outer_lr = 0.7
    config.edge.outer_momentum = 0.9  # Nesterov; 0 with outer_lr 1.0 = FedAvg / local SGD
    config.edge.delta_dtype = "float32"  # float32 | bfloat16 | int8 (error feedback for the low-precision ones)
    config.edge.fragments = 1  # F > 1: the k-th sync sends parameter group k mod F (streaming)
    config.edge.split = "iid"  # iid | label (non-IID: each node holds a few classes)
    config.edge.skip_prob = 0.0  # partial participation: each node misses each sync round with this probability

    config.tracking = ml_collections.ConfigDict()  # metrics.jsonl is always written; these are extra writers
    config.tracking.tensorboard = True  # workdir/tensorboard: train/, dev/, test/ scalars, hparams, confusion matrix
    config.tracking.wandb = False  # Weights & Biases (pip install 'lepton_jax[wandb]')
    config.tracking.wandb_project = "lepton_jax"
    config.tracking.wandb_mode = "offline"  # online | offline (sync later with `wandb sync`) | disabled

    config.robust = default_robust_config()  # objective "standard" = ordinary training
    return config
