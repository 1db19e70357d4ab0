"""Training strategies: what differs between synchronous data parallel (with any objective) and edge training.

A strategy owns the mesh, the compiled step and sync programs and the layout of its state; the loop
(:mod:`lepton_jax.train.loop`) owns everything else (resume, logging, NaN handling, hooks, preemption, report).
:func:`lepton_jax.train.choose.make_strategy` picks one from the config: ``edge.nodes > 1`` is edge training
(:mod:`lepton_jax.train.edge`), otherwise synchronous data parallel (:class:`SyncStrategy`) whose step is the objective
``robust.objective`` selects. Imports run one way: ``edge`` builds on this module, ``choose`` on both.
"""

from __future__ import annotations

import abc
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lepton_jax.checkpoint import PARAMS
from lepton_jax.data import LakeDataSource, train_dataset
from lepton_jax.errors import ConfigError
from lepton_jax.parallel import batch_sharding, make_mesh, replicated
from lepton_jax.parallel.build import build
from lepton_jax.parallel.mesh import data_parallel_size
from lepton_jax.parallel.rules import sharding_table, state_shardings
from lepton_jax.train.optim import make_optimizer, make_schedule
from lepton_jax.train.state import TrainState, create_state
from lepton_jax.train.step import build_train_step, make_predict, optimizer_updates_per_step


def grain_read_options(prefetch: int) -> grain.ReadOptions | None:
    """With the loop's own prefetch thread (``prefetch > 0``) Grain reads in that thread: its default pool of 16
    reader threads polling futures only adds CPU time that the step, on a CPU backend, competes for (measured with
    ``scripts/bench_train.py --profile``)."""
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0) if prefetch > 0 else None


@jax.jit
def _stack_steps(window: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """Per-step metric dicts -> one array per metric, steps first (values unchanged: a copy)."""
    return jax.tree.map(lambda *steps: jnp.stack(steps), *window)


class Strategy(abc.ABC):
    """The interface the loop drives. Attributes: ``name``, ``mesh``, ``data_sharding`` (train batches),
    ``eval_sharding`` (eval batches), ``built`` (:class:`lepton_jax.parallel.build.Built`), ``predict``
    (jitted ``(params, x) -> logits`` for evaluation), ``steps_per_epoch``, ``total_steps``, ``schedule`` and
    ``updates_per_step`` (learning rate at a step), ``eval_batch`` (global eval batch size)."""

    name = "strategy"

    @abc.abstractmethod
    def init_state(self, params: Any = None) -> Any:
        """A fresh state, from the model's random initialisation or from ``params`` (placed like
        ``built.abstract_params``: fine-tuning, see :mod:`lepton_jax.train.init`)."""
        ...

    def init_params(self) -> Any:
        """The model's random initialisation, created with its shardings."""
        return jax.jit(self.built.init_params, out_shardings=self.built.shardings)()

    @abc.abstractmethod
    def abstract_items(self) -> dict[str, Any]:
        """The checkpoint items of a state, as abstract arrays with shardings (what a resume restores into)."""
        ...

    @abc.abstractmethod
    def items(self, state: Any) -> dict[str, Any]:
        """The state as a dict of pytrees for :class:`lepton_jax.checkpoint.Checkpointer` (``params`` = the
        parameters inference uses)."""
        ...

    @abc.abstractmethod
    def from_items(self, items: dict[str, Any]) -> Any:
        ...

    @abc.abstractmethod
    def batches(self, source: LakeDataSource, schema: dict[str, Any]) -> Any:
        """The Grain iterator of host batches (numpy) this strategy trains on."""
        ...

    @abc.abstractmethod
    def step(self, state: Any, batch: Any) -> tuple[Any, dict[str, jax.Array]]:
        ...

    def after_step(self, state: Any, step: int) -> Any:
        """Work between steps (edge: the periodic sync). Default: none."""
        return state

    def eval_params(self, state: Any) -> Any:
        return state.params

    def copy_metrics(self, window: list[dict[str, jax.Array]]) -> Any:
        """Starts copying the device metrics of several steps (a non-empty list, one dict per step) to the host;
        :meth:`fetch_metrics` reads what this returns. Here the window is stacked on the device first (one small
        program queued behind the steps), so each metric is one copy, not one per step."""
        stacked = _stack_steps(window)
        for values in stacked.values():
            values.copy_to_host_async()
        return stacked

    def fetch_metrics(self, copying: Any) -> list[dict[str, float]]:
        """The metrics :meth:`copy_metrics` started copying, as host floats (one dict per step)."""
        host = jax.device_get(copying)
        steps = len(next(iter(host.values())))
        return [{k: float(np.mean(v[i])) for k, v in host.items()} for i in range(steps)]

    def step_info(self, step: int) -> dict[str, Any]:
        """Extra fields for a logged step (edge: bytes communicated so far)."""
        return {}

    def run_info(self) -> dict[str, Any]:
        """Extra fields for run.json."""
        return {}

    def describe(self) -> str:
        return ""

    def summary_extra(self, for_summary: bool = False) -> dict[str, Any]:
        """Extra fields for the returned result (``for_summary``: only JSON-able ones, for summary.json)."""
        return {}

    def flops(self, state: Any, batch: Any) -> float | None:
        """FLOPs of one step per XLA's cost analysis (for MFU), or None."""
        return None


class SyncStrategy(Strategy):
    """Synchronous data parallel training (any mesh: data, FSDP, tensor) with the objective the config selects."""

    name = "sync"

    def __init__(self, config: ml_collections.ConfigDict, schema: dict[str, Any], num_train: int,
                 devices: list | None = None):
        self.config = config
        self.mesh = mesh = make_mesh(config.mesh, devices)
        dp = data_parallel_size(mesh)
        accum = config.grad_accum_steps
        if config.batch_size % (dp * accum):
            raise ConfigError(f"batch_size {config.batch_size} is not divisible by {dp} data-parallel devices x "
                              f"{accum} gradient-accumulation steps (mesh {dict(mesh.shape)})")
        self.steps_per_epoch = num_train // config.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"batch_size {config.batch_size} exceeds the {num_train} training examples")
        self.total_steps = self.steps_per_epoch * config.num_epochs
        self.built = built = build(config, schema, mesh)
        self.updates_per_step = optimizer_updates_per_step(config)
        self.tx = tx = make_optimizer(config.optim, self.total_steps * self.updates_per_step)
        self.schedule = make_schedule(config.optim, self.total_steps * self.updates_per_step)

        def init() -> TrainState:
            return create_state(built.init_params(), tx, config.seed)

        self._init = init
        abstract = jax.eval_shape(init)
        self.state_shardings = sh = state_shardings(abstract, built.shardings, mesh)
        self.abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                           abstract, sh)
        self.data_sharding = self.eval_sharding = data_sh = batch_sharding(mesh)
        repl = replicated(mesh)
        self._step = jax.jit(build_train_step(config, built.graphdef, tx, mesh=mesh, param_specs=built.specs,
                                              task=built.task),
                             in_shardings=(sh, data_sh), out_shardings=(sh, repl), donate_argnums=0)
        self.predict = jax.jit(make_predict(built.graphdef), in_shardings=(built.shardings, data_sh),
                               out_shardings=data_sh)
        self.eval_batch = config.eval_batch_size + (-config.eval_batch_size) % dp

    def init_state(self, params: Any = None) -> TrainState:
        if params is None:
            return jax.jit(self._init, out_shardings=self.state_shardings)()  # parameters are created sharded
        return jax.jit(lambda p: create_state(p, self.tx, self.config.seed),
                       out_shardings=self.state_shardings)(params)

    def items(self, state: TrainState) -> dict[str, Any]:
        return {PARAMS: state.params, "train": {"opt_state": state.opt_state, "step": state.step,
                                                "rng": state.rng}}

    def abstract_items(self) -> dict[str, Any]:
        return self.items(self.abstract_state)

    def from_items(self, items: dict[str, Any]) -> TrainState:
        t = items["train"]
        return TrainState(step=t["step"], params=items[PARAMS], opt_state=t["opt_state"], rng=t["rng"])

    def batches(self, source: LakeDataSource, schema: dict[str, Any]) -> Any:
        return iter(train_dataset(source, global_batch_size=self.config.batch_size, seed=self.config.seed,
                                  num_epochs=self.config.num_epochs, schema=schema,
                                  read_options=grain_read_options(self.config.prefetch),
                                  augment=self.config.augment))

    def step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        return self._step(state, batch)

    def flops(self, state: TrainState, batch: Any) -> float | None:
        from lepton_jax.train import perf

        return perf.compiled_flops(self._step, state, batch)

    def describe(self) -> str:
        return (f"parameter sharding:\n{sharding_table(self.built.abstract_params, self.built.specs, self.mesh)}")

