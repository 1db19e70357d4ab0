"""Sweeps: a config file may define ``get_sweep()`` returning ``{"grid": {key: [values, ...]}}`` (every
combination) or ``{"list": [{key: value, ...}, ...]}``; each point is a set of dotted overrides run in its own
workdir, sequentially or in N local processes, followed by a summary table."""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

from lepton_jax import runs, tracking
from lepton_jax.config import load_config, resolve_config
from lepton_jax.errors import ConfigError


def sweep_points(config_path: str | Path) -> list[dict[str, Any]]:
    """The override dicts a config file's (or packaged config's) ``get_sweep()`` declares."""
    config_path, _ = resolve_config(config_path)
    spec = importlib.util.spec_from_file_location("lepton_sweep_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"{config_path} declares no sweep: define get_sweep() returning "
                          "{'grid': {key: [values]}} or {'list': [{key: value}]}")
    sweep = module.get_sweep()
    if "grid" in sweep:
        keys = list(sweep["grid"])
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*sweep["grid"].values())]
    if "list" in sweep:
        return [dict(point) for point in sweep["list"]]
    raise ConfigError(f"get_sweep() in {config_path} must return a dict with 'grid' or 'list'")


def point_name(point: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items()).replace("/", "_").replace(" ", "") or "base"


def run_sweep(config_path: str | Path, workdir: str | Path, *, lake_root: str | Path | None = None,
              processes: int = 1, extra_overrides: list[str] = (), progress: bool = True) -> str:
    """Runs every sweep point (validating all overrides first) and writes ``summary.md`` and ``summary.json``."""
    workdir = Path(workdir)
    points = sweep_points(config_path)
    overrides = {point_name(p): [*extra_overrides, *(f"{k}={v}" for k, v in p.items())] for p in points}
    from lepton_jax.train.validate import validate_config

    for items in overrides.values():  # fail before any training if a point names a bad key, type or value
        validate_config(load_config(config_path, items))
    if processes <= 1:
        from lepton_jax.train.loop import train

        for name, items in overrides.items():
            if progress:
                print(f"== sweep point {name}", flush=True)
            train(load_config(config_path, items), workdir / name, lake_root=lake_root,  # same path as the CLI
                  progress=progress)
    else:
        pending = list(overrides.items())
        running: list[tuple[str, subprocess.Popen]] = []
        while pending or running:
            while pending and len(running) < processes:
                name, items = pending.pop(0)
                cmd = [sys.executable, "-m", "lepton_jax.cli", "train", "--config", str(config_path), "--workdir",
                       str(workdir / name), "--no-progress", *(f"--config.{o}" for o in items)]
                if lake_root:
                    cmd += ["--lake", str(lake_root)]
                running.append((name, subprocess.Popen(cmd)))
            name, proc = running.pop(0)
            if proc.wait() != 0:
                raise ConfigError(f"sweep point {name} failed with exit code {proc.returncode}")
    summaries = [runs.run_summary(workdir / name) for name in overrides]
    keys = sorted({k for p in points for k in p})
    text = runs.table(summaries, keys)
    (workdir / "summary.md").write_text(text + "\n")
    tracking.write_json_atomic(workdir / "summary.json", [{k: v for k, v in s.items() if k != "config"}
                                                          for s in summaries])
    return text
