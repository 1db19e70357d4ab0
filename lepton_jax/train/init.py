"""Starting parameters: random, a run's checkpoint or a registered model version, through one init path.

``config.init.source`` picks where a run's parameters start (only for a fresh run; a resume restores its own
checkpoint): ``none`` (the model's random initialisation), ``run`` (``init.workdir``'s best or latest checkpoint, read
with :func:`lepton_jax.checkpoint.restore_params`, digests checked) or ``registry`` (``init.ref``, ``NAME@STAGE`` or
``NAME@VERSION``, in ``init.lake`` or the training lake, read with :mod:`lepton_jax.model_store`, its sha256 checked).

The architecture must match: every leaf of the model this config builds takes the stored leaf of the same '/'-joined
path (``convs/0/kernel``), and every missing, extra or different-shape leaf is reported in one :class:`InitError`
line, unless it matches an ``init.reinit`` pattern (a regular expression matched in full): those keep the fresh
random initialisation (e.g. ``('head/.*',)`` when the number of classes changes). :func:`resolve` checks all of this
from the stored shapes alone, before a run writes anything; :func:`initial_params` reads the arrays.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from lepton_jax.errors import ConfigError, LeptonError
from lepton_jax.train.optim import compile_patterns, param_path

SOURCES = ("none", "registry", "run")
CHECKPOINTS = ("best", "latest")
_KEYSTR_PART = re.compile(r"\['([^']*)'\]|\[(\d+)\]|\.(\w+)")


class InitError(LeptonError):
    """Starting parameters cannot be found or do not fit the model the config builds."""


def check_init_config(init: ml_collections.ConfigDict) -> None:
    """One-line :class:`ConfigError` for a bad ``config.init`` section (no file or lake is read)."""
    if init.source not in SOURCES:
        raise ConfigError(f"unknown init.source {init.source!r}; use one of {', '.join(SOURCES)}")
    if init.source == "registry" and not str(init.ref).strip():
        raise ConfigError("init.source='registry' needs init.ref, a model reference such as digits@production or "
                          "digits@3")
    if init.source == "run" and not str(init.workdir).strip():
        raise ConfigError("init.source='run' needs init.workdir, the run directory whose checkpoint to start from")
    if init.checkpoint not in CHECKPOINTS:
        raise ConfigError(f"unknown init.checkpoint {init.checkpoint!r}; use best or latest")
    reinit = compile_patterns("init.reinit", init.reinit)
    if reinit and init.source == "none":
        raise ConfigError("init.reinit applies to stored parameters; set init.source to registry or run")


@dataclasses.dataclass(frozen=True)
class Parent:
    """Where a run's parameters start: ``lineage`` (what run.json, the summary and a registry record say about it),
    ``leaves`` (stored '/'-joined path -> (shape, dtype)) and ``load`` (reads the arrays, digests checked)."""

    lineage: dict[str, Any]
    leaves: dict[str, tuple[tuple[int, ...], str]]
    load: Callable[[], dict[str, np.ndarray]] = dataclasses.field(repr=False)

    @property
    def name(self) -> str:
        """``digits@3`` (from ``digits@production``) or ``run DIR step N``."""
        lin = self.lineage
        if lin["source"] == "registry":
            return f"{lin['model']} ({lin['ref']})" if lin["ref"] != lin["model"] else lin["model"]
        return f"run {lin['workdir']} step {lin['step']}"


def resolve(config: ml_collections.ConfigDict, lake_root: str | Path | None = None) -> Parent | None:
    """The starting point ``config.init`` names, checked to exist (reference, stage, checkpoints) without reading any
    parameters; None for random initialisation. ``lake_root`` is the training lake (registry default)."""
    init = config.init
    check_init_config(init)
    if init.source == "registry":
        return _registry_parent(init, str(init.lake).strip() or str(lake_root or config.data.lake))
    if init.source == "run":
        return _run_parent(init)
    return None


def _registry_parent(init: ml_collections.ConfigDict, lake: str) -> Parent:
    from lepton_jax.lake import Lake
    from lepton_jax.lake.storage import open_storage
    from lepton_jax.model_store import read_leaves, resolve_record

    Lake(lake).require()
    storage = open_storage(lake)
    ref = str(init.ref).strip()
    record = resolve_record(storage, ref)
    model = f"{record['name']}@{record['version']}"
    if "params" not in record:
        raise InitError(f"init.ref {ref} ({model}) is an older registry record whose parameters live in run directory "
                        f"{record['checkpoint']['workdir']}: re-register it, or use init.source=run with that "
                        "init.workdir")
    manifest = record["params"]
    leaves = {_slash(m["path"]): (tuple(m["shape"]), m["dtype"]) for m in manifest["leaves"]}
    data = record["data"]
    lineage = {"source": "registry", "ref": ref, "model": model, "name": record["name"],
               "version": int(record["version"]), "lake": str(storage.uri), "params_sha256": manifest["sha256"],
               "data": {"lake": data["lake"], "table": data["table"], "version": data["version"]}}

    def load() -> dict[str, np.ndarray]:
        return {_slash(p): a for p, a in read_leaves(storage, manifest, what=f"model {model}")}

    return Parent(lineage, leaves, load)


def _run_parent(init: ml_collections.ConfigDict) -> Parent:
    from lepton_jax.checkpoint import open_checkpoints, read_run, restore_params
    from lepton_jax.parallel.build import build
    from lepton_jax.parallel.mesh import make_mesh, mesh_config

    workdir = Path(str(init.workdir).strip()).resolve()
    run_config, run_info = read_run(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise InitError(f"init.workdir {workdir} has no checkpoints/ folder; train it first or pick another run")
    ckpt = open_checkpoints(workdir / "checkpoints", run_config.checkpoint.best_metric,
                            run_config.checkpoint.best_mode)
    try:
        step = ckpt.best_step() if init.checkpoint == "best" else None
        step = step if step is not None else ckpt.latest_step()
    finally:
        ckpt.close()
    if step is None:
        raise InitError(f"init.workdir {workdir} has no checkpoint to start from; train it first or pick another run")
    mesh = make_mesh(mesh_config({"data": -1}))
    abstract = build(run_config, run_info["data"]["schema"], mesh, replicate=True).abstract_params
    leaves = {param_path(p): (tuple(a.shape), np.dtype(a.dtype).name)
              for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    data = run_info["data"]
    lineage = {"source": "run", "workdir": str(workdir), "checkpoint": init.checkpoint, "step": int(step),
               "data": {"lake": data["lake"], "table": data["table"], "version": data["version"]},
               "parent": (run_info.get("lineage") or {}).get("parent")}

    def load() -> dict[str, np.ndarray]:
        _, params, _ = restore_params(workdir, step, mesh)
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        return {param_path(p): np.asarray(jax.device_get(a)) for p, a in flat}

    return Parent(lineage, leaves, load)


def _slash(keystr: str) -> str:
    """``['convs'][0]['kernel']`` (a manifest's path) -> ``convs/0/kernel``."""
    return "/".join(next(g for g in m.groups() if g is not None) for m in _KEYSTR_PART.finditer(keystr))


def reinitialized(config: ml_collections.ConfigDict, parent: Parent, abstract_params: Any) -> list[str]:
    """The model's leaves that keep their fresh initialisation (those ``init.reinit`` matches); an :class:`InitError`
    line naming every other leaf that is missing from, extra in, or shaped differently in the stored parameters."""
    patterns = compile_patterns("init.reinit", config.init.reinit)
    model = {param_path(p): (tuple(a.shape), np.dtype(a.dtype).name)
             for p, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}

    def listed(path: str) -> bool:
        return any(p.fullmatch(path) for p in patterns)

    missing = [p for p in model if p not in parent.leaves and not listed(p)]
    extra = [p for p in parent.leaves if p not in model and not listed(p)]
    differ = [f"{p} {_shape(parent.leaves[p])} vs {_shape(model[p])}" for p in model
              if p in parent.leaves and parent.leaves[p] != model[p] and not listed(p)]
    if missing or extra or differ:
        parts = [f"{what}: {', '.join(items)}" for what, items in
                 (("missing from the stored parameters", missing), ("not in the model", extra),
                  ("stored vs model shape", differ)) if items]
        raise InitError(f"starting parameters from {parent.name} do not fit the model this config builds ("
                        f"{'; '.join(parts)}); list the leaves to re-initialise in init.reinit (regexes over "
                        "'/'-joined paths, e.g. \"init.reinit=('head/.*',)\") or fix model/data")
    return [p for p in model if listed(p)]


def _shape(entry: tuple[tuple[int, ...], str]) -> str:
    shape, dtype = entry
    return f"{dtype}{list(shape)}"


def initial_params(parent: Parent, fresh_params: Any, keep: list[str]) -> Any:
    """``fresh_params`` (the model's random initialisation, placed with its shardings) with every leaf not in
    ``keep`` replaced by the stored one, placed like the leaf it replaces."""
    stored = parent.load()
    keep_set = set(keep)

    def pick(path, leaf):
        name = param_path(path)
        if name in keep_set:
            return leaf
        value = stored[name].astype(leaf.dtype, copy=False)  # each process places its own shards of the full array
        return jax.make_array_from_callback(value.shape, leaf.sharding, lambda index: value[index])

    return jax.tree_util.tree_map_with_path(pick, fresh_params)


def lineage(parent: Parent | None, data: dict[str, Any], reinit: list[str], frozen: list[str]) -> dict[str, Any]:
    """What run.json, summary.json and a registry record made from the run say about where it came from: the parent
    (None for random initialisation) with the table version it was trained on, and this run's table version."""
    return {"parent": parent.lineage if parent else None,
            "data": {"lake": data["lake"], "table": data["table"], "version": data["version"]},
            "reinitialized": reinit, "frozen": frozen}


def frozen_leaves(config: ml_collections.ConfigDict, abstract_params: Any) -> list[str]:
    """'/'-joined paths of the parameters ``optim.freeze`` matches."""
    patterns = compile_patterns("optim.freeze", config.optim.freeze)
    return [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
            if any(q.fullmatch(param_path(p)) for q in patterns)]
