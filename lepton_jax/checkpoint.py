"""Orbax checkpoints of the train state: async saves, keep-latest-N plus keep-best by a dev metric.

Items are saved separately so inference restores ``params`` without touching optimizer state. Orbax writes each
step into a temporary directory and renames it when complete, so a crash mid-save leaves earlier steps restorable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lepton_jax.errors import CheckpointError
from lepton_jax.train.state import TrainState


class Checkpointer:
    """A thin owner of an ``ocp.CheckpointManager`` for :class:`TrainState`."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 2, best_metric: str | None = "dev_accuracy",
                 best_mode: str = "max", async_save: bool = True, create: bool = True):
        self.directory = Path(directory).resolve()
        self.best_metric = best_metric
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            best_fn=(lambda m: float(m[best_metric])) if best_metric else None,
            best_mode=best_mode,
            keep_checkpoints_without_metrics=False,
            enable_async_checkpointing=async_save,
            create=create,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, state: TrainState, metrics: dict[str, float] | None = None,
             data_state: dict[str, Any] | None = None) -> None:
        """Saves asynchronously; ``data_state`` is the input iterator's state, saved with the model so a resumed
        run sees exactly the batches an uninterrupted run would."""
        step = int(jax.device_get(state.step))
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step, "rng": state.rng}),
            data=ocp.args.JsonSave(data_state or {}),
            digests=ocp.args.JsonSave(param_digests(state.params)),
        )
        self.manager.save(step, args=args, metrics=metrics)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step() if self.best_metric else self.manager.latest_step()

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Restores parameters at ``step`` (default: best, else latest) with the shardings of ``abstract_params``."""
        step = self.resolve_step(step)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params), digests=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
            raise CheckpointError(f"checkpoint {self.directory}/{step} does not match the model or is corrupt: "
                                  f"{_first_line(e)}") from e
        self._verify(step, restored.params, restored.digests)
        return restored.params

    def restore(self, abstract_state: TrainState, step: int | None = None
                ) -> tuple[TrainState, dict[str, Any]]:
        """Restores the whole train state and the data iterator state at ``step`` (default: latest)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        abstract_train = {"opt_state": abstract_state.opt_state, "step": abstract_state.step,
                          "rng": abstract_state.rng}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state.params),
                train=ocp.args.StandardRestore(abstract_train),
                data=ocp.args.JsonRestore(), digests=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
            raise CheckpointError(f"checkpoint {self.directory}/{step} does not match the model or is corrupt: "
                                  f"{_first_line(e)}") from e
        self._verify(step, restored.params, restored.digests)
        state = TrainState(step=restored.train["step"], params=restored.params,
                           opt_state=restored.train["opt_state"], rng=restored.train["rng"])
        return state, dict(restored.data or {})

    def _verify(self, step: int, params: Any, expected: dict[str, str] | None) -> None:
        """Orbax stores raw bytes without checksums; compare the parameters with the digests saved beside them."""
        if not expected:
            return
        actual = param_digests(params)
        bad = sorted(k for k in expected if actual.get(k) not in (None, expected[k]))
        if bad:
            raise CheckpointError(f"checkpoint {self.directory}/{step} is corrupt: parameters {', '.join(bad[:4])} "
                                  "do not match the digests written at save time")

    def resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self.best_step() or self.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}; train first with `lepton-jax train`")
        if step not in self.manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"steps: {list(self.manager.all_steps())}")
        return step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def open_checkpoints(directory: str | Path, best_metric: str | None = "dev_accuracy") -> Checkpointer:
    """Opens an existing checkpoint directory for reading, with a clear error when it is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist; train first with "
                              "`lepton-jax train --workdir ...`")
    return Checkpointer(directory, best_metric=best_metric, create=False, async_save=False)


def param_digests(params: Any) -> dict[str, str]:
    """sha256 per parameter leaf, for leaves this process can read whole (others are skipped)."""
    digests = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            continue
        value = np.ascontiguousarray(jax.device_get(leaf))
        digests[jax.tree_util.keystr(path)] = hashlib.sha256(value.tobytes()).hexdigest()
    return digests


def abstract_like(tree: Any, sharding: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` placed with ``sharding`` (one Sharding, or a matching tree of them): what
    Orbax restores into. Restoring onto another mesh is just another ``sharding``."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, sharding)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
