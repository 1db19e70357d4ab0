"""Training-step throughput of lepton_jax against a hand-written minimal jax.jit + optax step and loop.

Prints, measured in one run on the same device(s), model and batch:
  * steps/s of lepton_jax's jitted train step vs. a minimal step (goal: ratio >= 0.97);
  * steps/s of the full loop (Grain input from the lake, logging, dev eval + async checkpoint every
    --checkpoint-every steps) vs. the same strategy's bare jitted step (goal: ratio >= 0.9) and vs. an independent
    hand-written Flax + Optax + Grain loop on the same data and model (goal: ratio >= 0.95), interleaved repeats,
    with process CPU time per step and where the loop's main thread spent its time (--profile N: a cProfile too);
  * model FLOPs per step from XLA's cost analysis, and MFU where the device's peak is known.

    .venv/bin/python scripts/bench_train.py --config configs/digits_cnn.py --batch 64 --profile 25
    .venv/bin/python scripts/bench_train.py --config configs/digits_vit.py     # also digits_resnet.py
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from lepton_jax import tracking
from lepton_jax.config import load_config
from lepton_jax.data import LakeDataSource, to_global
from lepton_jax.lake import DigitsSource, Lake, ingest
from lepton_jax.models import build_model
from lepton_jax.train import perf
from lepton_jax.train.choose import make_strategy
from lepton_jax.train.hooks import Hook
from lepton_jax.train.loop import train_and_evaluate
from lepton_jax.train.optim import decay_mask, make_optimizer
from lepton_jax.train.state import create_state, split_model
from lepton_jax.train.step import build_train_step


def interleaved_rates(sides: dict, batch, steps: int, repeats: int) -> dict[str, list[float]]:
    """steps/s of each side over ``repeats`` timed runs of ``steps`` steps, the sides alternating run by run (equal
    numbers of repeats, so load on a shared machine hits both alike); each side compiled and warmed up first."""
    states = {}
    for name, (step, state) in sides.items():
        state, _ = step(state, batch)
        states[name] = jax.block_until_ready(state)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, (step, _) in sides.items():
            state = states[name]
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            rates[name].append(steps / (time.perf_counter() - start))
            states[name] = state
    return rates


def spread(values: list[float]) -> str:
    return f"median {np.median(values):.1f} (min {min(values):.1f}, max {max(values):.1f}, n={len(values)})"


def minimal_step(graphdef, config):
    """What a user would write by hand: optax.adamw with the same hyper-parameters and decay mask."""
    tx = optax.chain(optax.clip_by_global_norm(config.optim.clip_norm),
                     optax.adamw(optax.cosine_decay_schedule(config.optim.lr, 1000),
                                 weight_decay=config.optim.weight_decay,
                                 mask=decay_mask))

    def loss_fn(params, batch, key):
        logits = nnx.merge(graphdef, params)(batch["input"], train=True, rngs=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    def step(state, batch):
        params, opt_state, n = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, jax.random.fold_in(jax.random.PRNGKey(0), n))
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, n + 1), {"loss": loss}

    return jax.jit(step, donate_argnums=0), tx


class HandWrittenLoop:
    """An independent training loop, written as a Flax (nnx) + Optax + Grain user would write it, sharing no training
    code with lepton_jax: the config's model (the model zoo's CNN), its batch size, epochs, optimizer settings and seed,
    on the same lake table. The train split is read into memory once and fed by Grain's own
    ``MapDataset.range(n).shuffle(seed).batch(...).repeat(epochs)`` (the same example order as lepton_jax's) gathering
    each batch from the arrays by index (cheaper per batch than lepton_jax's reads from the lake), with Grain's default
    read-ahead (16 threads, 500 batches: over this small table it reads the whole run ahead, mostly before the timed
    window, where lepton_jax's loop reads 2 batches ahead in one thread), and ``jax.device_put``; the step is
    ``jax.jit`` of a pure function over ``nnx.split`` parameters with ``optax.adamw`` (warm-up + cosine, decay on
    kernels, global-norm clipping); every
    ``log_every_steps`` the step's loss and accuracy are fetched and appended to a JSON-lines file, and every
    ``eval_every_steps`` (and at the last step) the dev accuracy is computed and an asynchronous Orbax checkpoint of
    parameters + optimizer state is saved. Its jitted programs are built once and reused by every run (as lepton_jax's
    strategy is), so no timed run compiles."""

    def __init__(self, config, lake_root: str):
        self.config = config
        table = Lake(lake_root).table(config.data.table)
        spec = table.schema["arrays"]["image"]
        lo, hi = spec["value_range"]

        def load(split: str) -> tuple[np.ndarray, np.ndarray]:
            reader = table.reader(split)
            raw = reader.read(np.arange(len(reader)))
            return (raw["image"].astype(np.float32) - lo) / (hi - lo), raw[table.schema["label_array"]].astype(np.int32)

        self.train_x, self.train_y = load("train")
        self.dev_x, self.dev_y = load("dev")
        self.steps_per_epoch = len(self.train_x) // config.batch_size
        self.total_steps = self.steps_per_epoch * config.num_epochs

        model = build_model(config.model, input_shape=self.train_x.shape[1:], num_classes=10, seed=config.seed)
        graphdef, self.init_params = nnx.split(model, nnx.Param)
        o = config.optim
        schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, self.total_steps)
        kernels = jax.tree_util.tree_map_with_path(
            lambda path, _: any(getattr(k, "key", None) == "kernel" for k in path), self.init_params)
        self.tx = tx = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                                   optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=kernels))

        def train_step(params, opt_state, batch, key):
            def loss_fn(params):
                logits = nnx.merge(graphdef, params)(batch["input"], train=True, rngs=key)
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
                return loss, logits

            (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            accuracy = (logits.argmax(-1) == batch["label"]).mean()
            return optax.apply_updates(params, updates), opt_state, {"loss": loss, "accuracy": accuracy}

        def predict(params, x):
            return nnx.merge(graphdef, params)(x).argmax(-1)

        self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self.predict = jax.jit(predict)

    def dev_accuracy(self, params) -> float:
        size, n = self.config.eval_batch_size, len(self.dev_x)
        correct = 0
        for start in range(0, n, size):
            x = self.dev_x[start:start + size]
            if len(x) < size:  # pad the last batch to the compiled shape
                x = np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])
            correct += int((np.asarray(self.predict(params, x))[:n - start] == self.dev_y[start:start + size]).sum())
        return correct / n

    def run(self, workdir: str) -> dict[int, tuple[float, float]]:
        """Trains from scratch in ``workdir``; returns {step: (perf_counter, process_time) just after that step's dev
        evaluation}."""
        config = self.config
        x, y = self.train_x, self.train_y
        batches = (grain.MapDataset.range(len(x))
                   .shuffle(seed=config.seed)
                   .batch(config.batch_size, drop_remainder=True)
                   .repeat(config.num_epochs)
                   .map(lambda idx: {"input": x[idx], "label": y[idx]})
                   .to_iter_dataset())
        params = jax.tree.map(jnp.copy, self.init_params)
        opt_state = self.tx.init(params)
        key = jax.random.key(config.seed)
        checkpoints = ocp.CheckpointManager(os.path.abspath(f"{workdir}/checkpoints"),
                                            options=ocp.CheckpointManagerOptions(max_to_keep=2))
        evaluated = {}
        with open(f"{workdir}/log.jsonl", "w") as log:
            for step, batch in enumerate(batches, start=1):
                batch = jax.device_put(batch)
                params, opt_state, metrics = self.train_step(params, opt_state, batch, jax.random.fold_in(key, step))
                if step % config.log_every_steps == 0:
                    log.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
                    log.flush()
                if step % (config.eval_every_steps or self.steps_per_epoch) == 0 or step == self.total_steps:
                    accuracy = self.dev_accuracy(params)
                    evaluated[step] = time.perf_counter(), time.process_time()
                    log.write(json.dumps({"step": step, "dev_accuracy": accuracy}) + "\n")
                    checkpoints.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
        checkpoints.wait_until_finished()
        checkpoints.close()
        return evaluated


def main() -> None:
    print("load average (1, 5, 15 min) at start: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
          + f" on {os.cpu_count()} CPUs")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits_cnn.py")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per side (interleaved)")
    parser.add_argument("--epochs", type=int, default=15, help="epochs of each full-loop run")
    parser.add_argument("--loop-repeats", type=int, default=11, help="timed full-loop runs (each followed by the "
                        "bare step for as many steps)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N top entries of a cProfile of the last full-loop run")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between dev eval + checkpoint")
    args = parser.parse_args()
    overrides = [f"batch_size={args.batch}", f"num_epochs={args.epochs}", f"eval_every_steps={args.checkpoint_every}"]
    config = load_config(args.config, overrides)

    model = build_model(config.model, input_shape=(8, 8, 1), num_classes=10, seed=0)
    graphdef, params = split_model(model)
    rng = np.random.default_rng(0)
    batch = {"input": jnp.asarray(rng.uniform(size=(args.batch, 8, 8, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)}

    tx = make_optimizer(config.optim, total_steps=1000)
    ours = jax.jit(build_train_step(config, graphdef, tx), donate_argnums=0)
    theirs, base_tx = minimal_step(graphdef, config)
    flops = perf.compiled_flops(ours, create_state(params, tx, 0), batch) or float("nan")  # lowering donates nothing

    def fresh():  # donated buffers are consumed: every run starts from its own copy
        return jax.tree.map(jnp.copy, params)

    p0 = fresh()
    rates = interleaved_rates({"ours": (ours, create_state(fresh(), tx, 0)),
                               "theirs": (theirs, (p0, base_tx.init(p0), jnp.zeros((), jnp.int32)))},
                              batch, args.steps, args.repeats)
    ours_rate, theirs_rate = float(np.median(rates["ours"])), float(np.median(rates["theirs"]))
    ratios = [a / b for a, b in zip(rates["ours"], rates["theirs"], strict=True)]

    device = jax.devices()[0]
    print(f"device: {device.device_kind} x {jax.device_count()} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"model {config.model.name} ({args.config}), batch {args.batch}: {flops:.3e} FLOPs per step "
          "(XLA cost analysis)")
    print(f"command: {' '.join(sys.argv)}")
    print(f"lepton_jax step steps/s {spread(rates['ours'])}; minimal jit+optax step steps/s {spread(rates['theirs'])}")
    print(f"ratio of medians {ours_rate / theirs_rate:.3f}; per interleaved pair: median {np.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}) (goal >= 0.97)")
    utilisation = perf.mfu(flops, ours_rate)
    if utilisation is not None:
        print(f"MFU of the lepton_jax step: {utilisation:.3%} (peak {perf.peak_flops():.3g} FLOP/s per device)")
    else:
        print(f"MFU: no peak FLOP/s known for {device.device_kind!r} (see lepton_jax/train/perf.py)")

    with tempfile.TemporaryDirectory() as tmp:
        full_loop_vs_step(config, args, tmp)


def full_loop_vs_step(config, args, tmp: str) -> None:
    """The full loop against the bare step it runs and against an independent hand-written loop
    (:class:`HandWrittenLoop`), interleaved: each repeat trains the config in a fresh workdir (the strategy, i.e. every
    compiled program, is shared, so no repeat compiles), then runs the same strategy's jitted step alone on one
    device-resident batch for as many steps as the loop's timed window, then trains the hand-written loop in its own
    fresh workdir. Each loop's window runs from its first dev evaluation (compilation and start-up done) to its last
    one (the final step) and includes its input pipeline, its logging and the dev evaluations + asynchronous
    checkpoints inside it; start-up and the final report are outside. Repeat 0 (compiling evaluation and checkpoint
    paths) is not timed. With ``--profile`` the main thread of the last lepton_jax repeat is profiled (cProfile)."""
    ingest(Lake(f"{tmp}/lake"), "digits", DigitsSource())
    table = Lake(f"{tmp}/lake").table(config.data.table)
    strategy = make_strategy(config, table.schema, LakeDataSource(table.reader("train")))
    host = next(strategy.batches(LakeDataSource(table.reader("train")), table.schema))
    batch = to_global(host, strategy.data_sharding)
    state = strategy.init_state()
    state, _ = strategy.step(state, batch)  # compile once for the bare side
    jax.block_until_ready(state)
    handwritten = HandWrittenLoop(config, f"{tmp}/lake")
    loop_rates, step_rates, hand_rates, loop_cpu, step_cpu, hand_cpu, loads = [], [], [], [], [], [], []
    profile = None
    for repeat in range(args.loop_repeats + 1):  # repeat 0 compiles eval/checkpoint paths: not timed
        profiler = cProfile.Profile() if args.profile and repeat == args.loop_repeats else None
        if profiler:
            profiler.enable()
        clock: dict[int, float] = {}  # step -> process CPU seconds, at the evaluation steps (no extra sync)
        hook = Hook(lambda ctx, clock=clock: clock.__setitem__(ctx.step, time.process_time()), config.eval_every_steps,
                    name="bench_cpu_clock")
        result = train_and_evaluate(config, f"{tmp}/run{repeat}", lake_root=f"{tmp}/lake", progress=False,
                                    strategy=strategy, hooks=[hook])
        if profiler:
            profiler.disable()
            profile = profiler
        evals = [r for r in tracking.read_metrics(f"{tmp}/run{repeat}") if "elapsed_s" in r]
        if len(evals) < 2:
            sys.exit("full loop: fewer than two evaluations to time; raise --epochs or lower --checkpoint-every")
        first, last = evals[0], evals[-1]
        steps = last["step"] - first["step"]
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            state, metrics = strategy.step(state, batch)
        jax.block_until_ready((state, metrics))
        bare = steps / (time.perf_counter() - start)
        step_cpu_time = time.process_time() - cpu
        os.makedirs(f"{tmp}/hand{repeat}")
        hand_evals = handwritten.run(f"{tmp}/hand{repeat}")
        if sorted(hand_evals)[0] != first["step"] or sorted(hand_evals)[-1] != last["step"]:
            sys.exit(f"hand-written loop evaluated at {sorted(hand_evals)}, lepton_jax at {first['step']}.."
                     f"{last['step']}: the windows differ")
        loads.append(os.getloadavg()[0])
        if repeat:
            loop_rates.append(steps / (last["elapsed_s"] - first["elapsed_s"]))
            step_rates.append(bare)
            hand_rates.append(steps / (hand_evals[last["step"]][0] - hand_evals[first["step"]][0]))
            hand_cpu.append((hand_evals[last["step"]][1] - hand_evals[first["step"]][1]) / steps)
            loop_cpu.append((clock[last["step"]] - clock[first["step"]]) / steps)
            step_cpu.append(step_cpu_time / steps)
    vs_step = [a / b for a, b in zip(loop_rates, step_rates, strict=True)]
    vs_hand = [a / b for a, b in zip(loop_rates, hand_rates, strict=True)]
    print(f"full loop steps/s {spread(loop_rates)} over steps {first['step']}..{last['step']} of each run (Grain "
          f"from the lake + prefetch thread, logging every {config.log_every_steps} steps, dev eval + async "
          f"checkpoint every {config.eval_every_steps} steps); bare step of the same strategy steps/s "
          f"{spread(step_rates)}")
    print(f"hand-written Flax+Optax+Grain loop steps/s {spread(hand_rates)} over the same steps (Grain shuffle/batch "
          "over the split in memory, jax.jit step, logging, dev eval + async Orbax checkpoint at the same steps)")
    print(f"full loop / bare step: ratio of medians {np.median(loop_rates) / np.median(step_rates):.3f}; per "
          f"interleaved pair: median {np.median(vs_step):.3f} (min {min(vs_step):.3f}, max {max(vs_step):.3f}) "
          "(goal >= 0.9)")
    print(f"full loop / hand-written loop: ratio of medians {np.median(loop_rates) / np.median(hand_rates):.3f}; per "
          f"interleaved pair: median {np.median(vs_hand):.3f} (min {min(vs_hand):.3f}, max {max(vs_hand):.3f}) "
          "(goal >= 0.95)")
    print(f"load average (1 min) after each repeat: median {np.median(loads):.2f} (min {min(loads):.2f}, max "
          f"{max(loads):.2f}) on {os.cpu_count()} CPUs; (1, 5, 15 min) now: "
          + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    cpu_ratios = [b / a for a, b in zip(loop_cpu, step_cpu, strict=True)]
    print(f"process CPU time per step (all threads; less sensitive to other users' load): full loop "
          f"{1e3 * np.median(loop_cpu):.2f} ms, bare step {1e3 * np.median(step_cpu):.2f} ms, hand-written loop "
          f"{1e3 * np.median(hand_cpu):.2f} ms: bare/loop median {np.median(cpu_ratios):.3f} "
          f"(min {min(cpu_ratios):.3f}, max {max(cpu_ratios):.3f})")
    print(f"(the loop reached test accuracy {result['test_accuracy']:.4f})")
    phases = result["loop_time_s"]
    total = sum(phases.values())
    print(f"where the loop's main thread spent its {total:.2f} s in the last run ({result['steps']} steps, "
          "start-up and final report excluded; step_dispatch includes waiting when XLA's queue is full, "
          "metrics_fetch_and_log includes waiting for the step whose metrics are read):")
    for name, seconds in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<24} {seconds:7.3f} s {seconds / total:6.1%}")
    if profile is not None:
        print("profile of the last loop repeat (main thread, cProfile, by cumulative time):")
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.profile)


if __name__ == "__main__":
    main()
