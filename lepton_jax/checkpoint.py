"""Orbax checkpoints of any dict of pytrees: async saves, the latest N and the best K kept independently.

A checkpoint at step s holds one Orbax item per entry of the dict it was given (``params`` is required: inference
restores it alone, without optimizer state), the input iterator's state (``data``) and a sha256 per parameter
(``digests``, checked on restore). Retention is two Orbax preservation policies joined by "any":
``LatestN(keep_latest)`` and ``BestN(keep_best)`` by a metric (``best_metric``/``best_mode``); a step saved with
``co_flagged`` true in its metrics (catastrophic overfitting suspected), without metrics or with a non-finite best
metric (NaN: a diverged run) is never *best*, but it stays on disk while it is one of the latest N. Orbax writes each
step into a temporary directory and renames it when complete, so a crash mid-save leaves earlier steps restorable.

In one process, an asynchronous save takes the caller's thread only for a device copy of the items: Orbax's blocking
part (device-to-host copy, directories, starting its commit threads) and the parameter digests run on a background
thread over that copy, so a training loop goes on (and donates the state to its next step) at once. The copy holds
one extra device copy of the items until Orbax has them on the host. Every other method first waits for that thread
and re-raises what failed there. With several processes Orbax synchronises them with device collectives, whose order
must match on every process, so there the save stays on the caller's thread; ``background=False``
(``checkpoint.background_copy = False``: a state too large to copy on the device) keeps it there too.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from lepton_jax.errors import CheckpointError

PARAMS, DATA, DIGESTS = "params", "data", "digests"
FLAGGED = "co_flagged"  # a metric that, when true, makes a step ineligible as best


class Checkpointer:
    """A thin owner of an ``ocp.CheckpointManager`` for a dict of pytrees (one of them ``params``)."""

    def __init__(self, directory: str | Path, *, keep_latest: int = 2, keep_best: int = 1,
                 best_metric: str | None = "dev_accuracy", best_mode: str = "max", async_save: bool = True,
                 create: bool = True, background: bool = True):
        if best_mode not in ("max", "min"):
            raise CheckpointError(f"checkpoint.best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = Path(directory).resolve()
        self.best_metric, self.best_mode = best_metric, best_mode
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=max(1, keep_latest))]
        if best_metric and keep_best > 0:
            policies.append(pp.BestN(get_metric_fn=self._score, reverse=False, n=keep_best,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            # best_fn only makes Orbax write each step's metrics (it writes them only when it tracks a best; a
            # resume reads train_seconds from them even without a best_metric); retention is the preservation
            # policy above and best_step() below
            best_fn=self._score,
            best_mode="max",
            enable_async_checkpointing=async_save,
            create=create,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        # one background thread for Orbax's blocking part of an async save (see the module docstring)
        self._saver = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="lepton-checkpoint")
                       if async_save and background and jax.process_count() == 1 else None)
        self._pending: Future | None = None

    def _join(self) -> None:
        """Waits for the background save in flight, if any, and re-raises what failed there."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _score(self, metrics: dict[str, Any] | None) -> float:
        """Higher is better; -inf for steps that may not be best (no metric, a NaN or infinite one -- a diverged
        run's -- or CO-flagged). Orbax sorts by this score, and a NaN would compare false with every other one and
        could take the best's place."""
        if not metrics or metrics.get(FLAGGED) or self.best_metric not in metrics:
            return -math.inf
        value = float(metrics[self.best_metric])
        if not math.isfinite(value):
            return -math.inf
        return value if self.best_mode == "max" else -value

    def save(self, step: int, items: dict[str, Any], metrics: dict[str, float] | None = None,
             data_state: dict[str, Any] | None = None) -> bool:
        """Saves ``items`` (a dict of pytrees holding ``params``) asynchronously; ``data_state`` is the input
        iterator's state, saved with the model so a resumed run sees exactly the batches an uninterrupted run
        would. A step already on disk is not written again (returns False; True when this call saved it)."""
        if PARAMS not in items:
            raise CheckpointError(f"checkpoint items must include {PARAMS!r}, got {sorted(items)}")
        self._join()
        if step in self.manager.all_steps():
            return False
        clean = None if metrics is None else {k: (bool(v) if isinstance(v, bool | np.bool_) else float(v))
                                              for k, v in metrics.items()}
        if self._saver is None:
            self._save(step, items, clean, data_state)
        else:  # the caller may donate or delete its arrays as soon as this returns: Orbax gets copies
            copies = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array | np.ndarray) else x, items)
            self._pending = self._saver.submit(self._save, step, copies, clean, data_state)
        return True

    def _save(self, step: int, items: dict[str, Any], metrics: dict[str, Any] | None,
              data_state: dict[str, Any] | None) -> None:
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        args[DATA] = ocp.args.JsonSave(data_state or {})
        args[DIGESTS] = ocp.args.JsonSave(param_digests(items[PARAMS]))
        self.manager.save(step, args=ocp.args.Composite(**args), metrics=metrics)

    def steps(self) -> list[int]:
        self._join()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        self._join()
        return self.manager.latest_step()

    def metrics(self, step: int) -> dict[str, Any] | None:
        self._join()
        try:
            return self.manager.metrics(step)
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` among those eligible (not CO-flagged, with metrics); ties go to
        the later step. None when no step is eligible."""
        if not self.best_metric:
            return None
        scored = [(self._score(self.metrics(s)), s) for s in self.steps()]
        scored = [(v, s) for v, s in scored if v > -math.inf]
        return max(scored)[1] if scored else None

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Restores parameters at ``step`` (default: best, else latest) with the shardings of ``abstract_params``."""
        step = self.resolve_step(step)
        restored = self._restore(step, {PARAMS: abstract_params})
        return restored[PARAMS]

    def restore(self, abstract_items: dict[str, Any], step: int | None = None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores ``abstract_items`` (a dict of abstract pytrees, shardings included) and the data iterator state
        at ``step`` (default: latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        restored = self._restore(step, dict(abstract_items), data=True)
        data = restored.pop(DATA)
        return restored, dict(data or {})

    def _restore(self, step: int, abstract_items: dict[str, Any], data: bool = False) -> dict[str, Any]:
        self._join()
        args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
        args[DIGESTS] = ocp.args.JsonRestore()
        if data:
            args[DATA] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
            others = [other for other in self.steps() if other != step]
            hint = (f"; if it is damaged, remove {self.directory}/{step} to use step {others[-1]} (steps on disk: "
                    f"{self.steps()})" if others else "")
            raise CheckpointError(f"checkpoint {self.directory}/{step} does not match the model or is corrupt: "
                                  f"{_first_line(e)}{hint}") from e
        out = {name: restored[name] for name in args}
        if PARAMS in out:
            self._verify(step, out[PARAMS], out[DIGESTS])
        out.pop(DIGESTS)
        return out

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
        self._join()
        if step is None:
            step = self.best_step() or self.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}; train first with `lepton-jax train`")
        if step not in self.manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"steps: {self.steps()}")
        return step

    def wait(self) -> None:
        """Returns when every save so far is on disk (re-raising what failed in one)."""
        self._join()
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
            if self._saver is not None:
                self._saver.shutdown()


def from_config(directory: str | Path, checkpoint_config: Any, **kwargs: Any) -> Checkpointer:
    """A :class:`Checkpointer` with the retention a config's ``checkpoint`` section asks for."""
    c = checkpoint_config
    return Checkpointer(directory, keep_latest=c.keep_latest, keep_best=c.keep_best, best_metric=c.best_metric,
                        best_mode=c.best_mode, background=c.get("background_copy", True), **kwargs)


def open_checkpoints(directory: str | Path, best_metric: str | None = "dev_accuracy",
                     best_mode: str = "max") -> Checkpointer:
    """Opens an existing checkpoint directory for reading, with a clear error when it is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist; train first with "
                              "`lepton-jax train --workdir ...`")
    return Checkpointer(directory, best_metric=best_metric, best_mode=best_mode, create=False, async_save=False)


def read_run(workdir: str | Path) -> tuple[Any, dict[str, Any]]:
    """The resolved config and provenance (``run.json``) a training run saved in ``workdir``; keys the base config
    gained after the run was saved are filled from it (:func:`lepton_jax.config.saved_config`), so older runs still
    restore, evaluate and predict."""
    from lepton_jax import tracking
    from lepton_jax.config import saved_config

    workdir = Path(workdir)
    try:
        config = saved_config(tracking.read_json(workdir / tracking.CONFIG_FILE))
        run_info = tracking.read_json(workdir / tracking.RUN_FILE)
    except FileNotFoundError as e:
        raise CheckpointError(f"{workdir} is not a training run directory (missing {Path(e.filename).name}); "
                              "pass the --workdir of a `lepton-jax train` run") from e
    except ValueError as e:
        raise CheckpointError(f"run directory {workdir} has a corrupt config or run.json: {e}") from e
    return config, run_info


def restore_params(run: str | Path | Any, step: int | None = None, mesh: Any = None, *,
                   devices: list | None = None) -> tuple[Any, Any, int]:
    """The parameters of a training run: ``run`` is a workdir or a registry entry (anything with ``workdir`` and
    ``step``); ``step`` defaults to the entry's step, else the run's best checkpoint (by its config's
    ``checkpoint.best_metric``), else its latest. Restored replicated on ``mesh`` (default: a data-parallel mesh
    over ``devices``). Returns ``(built, params, step)`` with ``built`` from :func:`lepton_jax.parallel.build.build`
    (its ``graphdef`` applies the parameters)."""
    from lepton_jax.parallel.build import build
    from lepton_jax.parallel.mesh import make_mesh, mesh_config

    if hasattr(run, "workdir"):
        step = run.step if step is None else step
        run = run.workdir
    workdir = Path(run)
    config, run_info = read_run(workdir)
    if mesh is None:
        mesh = make_mesh(mesh_config({"data": -1}), devices)
    built = build(config, run_info["data"]["schema"], mesh, replicate=True)
    ckpt = open_checkpoints(workdir / "checkpoints", config.checkpoint.best_metric, config.checkpoint.best_mode)
    try:
        step = ckpt.resolve_step(step)
        params = ckpt.restore_params(built.abstract_params, step)
    finally:
        ckpt.close()
    return built, params, step


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
