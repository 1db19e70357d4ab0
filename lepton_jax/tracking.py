"""Run directories: the resolved config, provenance (git revision, package versions, seeds) and JSON-lines metrics.

Only process 0 writes. Every file is written atomically (temp file + rename) so a crash never leaves a torn one.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from lepton_jax import config as config_lib
from lepton_jax.errors import ConfigError

PACKAGES = ("lepton_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorstore", "grain", "numpy",
            "ml-collections", "scikit-learn")
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
TIMING_KEYS = ("elapsed_s", "train_seconds", "step_time_s", "examples_per_s", "mfu")


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes JSON to ``path`` via a temp file in the same directory and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure_atomic(fig, path: Path, dpi: int = 120) -> None:
    """Saves a matplotlib figure as PNG via a temp file and an atomic rename.

    Figures are built with the object-oriented ``matplotlib.figure.Figure`` API, so no pyplot state or backend
    (a notebook's inline backend, say) is touched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def git_revision(cwd: Path | None = None) -> str | None:
    """The current git commit (with ``-dirty`` when the tree has changes), or None outside a checkout."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What is needed to trace a result back to the exact command and software."""
    return {
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_revision": git_revision(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count(),
        **(extra or {}),
    }


class RunDir:
    """A run's working directory: config, provenance and metrics, written by process 0 only."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir)
        self.is_writer = jax.process_index() == 0
        self._tb = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.path.resolve() / "checkpoints"

    def check_same_config(self, config: ml_collections.ConfigDict) -> None:
        """A workdir holds one experiment: refuse to continue it with a different config."""
        path = self.path / CONFIG_FILE
        if not path.exists():
            return
        saved = flatten(read_json(path))
        current = flatten(config_lib.to_dict(config))
        diff = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        if diff:
            changes = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:5])
            raise ConfigError(f"workdir {self.path} holds a run with a different config ({changes}); "
                              "use a new --workdir, or the same config to resume")

    def start(self, config: ml_collections.ConfigDict, extra: dict[str, Any] | None = None) -> None:
        if not self.is_writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / CONFIG_FILE, config_lib.to_dict(config))
        write_json_atomic(self.path / RUN_FILE, provenance(extra))

    def update_run_info(self, **fields: Any) -> None:
        if not self.is_writer:
            return
        info = read_json(self.path / RUN_FILE)
        info.update(fields)
        write_json_atomic(self.path / RUN_FILE, info)

    def log(self, **metrics: Any) -> None:
        """Appends one JSON line (flushed, so a crash loses at most the line being written) and writes the
        numeric values with a ``step`` to TensorBoard event files in ``<workdir>/tensorboard``."""
        if not self.is_writer:
            return
        record = {k: _to_python(v) for k, v in metrics.items()}
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
        if "step" in record:
            writer = self._tensorboard()
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    writer.add_scalar(key, value, record["step"])
            writer.flush()

    def _tensorboard(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.path / TENSORBOARD_DIR), flush_secs=30)
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


    def truncate_metrics(self, after_step: int) -> None:
        """Drops metric lines logged after ``after_step`` (by a run that died before its next checkpoint)."""
        if not self.is_writer:
            return
        path = self.path / METRICS_FILE
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= after_step]
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.path)
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        os.replace(tmp, path)


def result_provenance(configs: list[str], data: str) -> str:
    """One line naming what a paper table came from: its configs, lake data version and git revision."""
    return f"configs: {', '.join(configs)}; data: {data}; git revision: {git_revision() or 'unknown'}"


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _to_python(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
