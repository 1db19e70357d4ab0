"""Run directories: the resolved config, provenance (git revision, package versions, seeds) and JSON-lines metrics,
mirrored to TensorBoard and optionally Weights & Biases.

Only process 0 writes. Every file is written atomically (temp file + rename) so a crash never leaves a torn one.

``metrics.jsonl`` is strict JSON, one record per line with a ``kind`` (``train``, ``eval``, ``summary``,
``resume``, ``event``); a non-finite value is written as ``null`` and its key listed under ``nonfinite``.
TensorBoard tags are grouped (``train/loss``, ``dev/accuracy``, ``test/accuracy``, ``perf/step_time_s``); the end of
a run adds the test metrics, the hparams (flattened config with the final metrics) and the confusion matrix image.
After a resume the writer purges the events a killed run logged past its last checkpoint (``purge_step``), so no
step appears twice. With ``config.tracking.wandb`` the same scalars, the summary and the image go to Weights & Biases
(one run id per workdir, resumed); W&B keeps what it received before a crash, since its steps only increase.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from lepton_jax import config as config_lib
from lepton_jax.errors import ConfigError
from lepton_jax.files import atomic_write

PACKAGES = ("lepton_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorstore", "grain", "numpy",
            "ml-collections", "scikit-learn")
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
TIMING_KEYS = ("elapsed_s", "train_seconds", "step_time_s", "examples_per_s", "mfu")
KINDS = ("train", "eval", "summary", "resume", "event", "other")
WANDB_MODES = ("online", "offline", "disabled")
_GROUPS = {"train_": "train/", "dev_": "dev/", "test_": "test/", "co_": "monitor/"}


def check_tracking_config(tc: ml_collections.ConfigDict) -> None:
    """One-line :class:`ConfigError` for a bad ``config.tracking`` section (or W&B asked for but not installed)."""
    if tc.wandb_mode not in WANDB_MODES:
        raise ConfigError(f"unknown tracking.wandb_mode {tc.wandb_mode!r}; use one of {', '.join(WANDB_MODES)}")
    if tc.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("tracking.wandb is on but wandb is not installed: pip install 'lepton_jax[wandb]'")


def record_kind(record: dict[str, Any]) -> str:
    """What a metrics record is, from its keys: train (step metrics), eval (dev evaluation, monitors), summary
    (end of run), resume, event (preempted, diverged) or other."""
    if "resumed_from_step" in record:
        return "resume"
    if "preempted" in record or "diverged" in record:
        return "event"
    if "test_accuracy" in record:
        return "summary"
    if any(k.startswith("train_") for k in record):
        return "train"
    if any(k.startswith(("dev_", "co_")) for k in record):
        return "eval"
    return "other"


def tensorboard_tag(key: str, kind: str) -> str:
    """The grouped tag of a metric: ``train_loss`` -> ``train/loss``, ``dev_accuracy`` -> ``dev/accuracy``,
    timings -> ``perf/…``; other keys go under their record's group (``lr`` -> ``train/lr``)."""
    for prefix, group in _GROUPS.items():
        if key.startswith(prefix):
            return group + key[len(prefix):]
    if key in TIMING_KEYS:
        return f"perf/{key}"
    return {"train": "train/", "eval": "dev/", "summary": "test/"}.get(kind, "run/") + key


def strict_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with non-finite floats replaced by ``None`` and their keys listed under ``nonfinite``."""
    bad = sorted(k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v))
    if not bad:
        return record
    return {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes JSON to ``path`` via a temp file in the same directory and an atomic rename."""
    with atomic_write(path) as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def save_figure_atomic(fig, path: Path, dpi: int = 120) -> None:
    """Saves a matplotlib figure as PNG via a temp file and an atomic rename.

    Figures are built with the object-oriented ``matplotlib.figure.Figure`` API, so no pyplot state or backend
    (a notebook's inline backend, say) is touched.
    """
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=dpi, format="png")


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


# x86 instruction-set levels XLA's CPU backend targets, lowest first (``--xla_cpu_max_isa`` takes these names), with
# the /proc/cpuinfo flag that shows each.
X86_ISAS = (("SSE4_2", "sse4_2"), ("AVX", "avx"), ("AVX2", "avx2"), ("AVX512", "avx512f"))


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_isa(cpuinfo: dict[str, str] | None = None, xla_flags: str | None = None) -> tuple[str, str]:
    """``(host ISA, the ISA XLA compiles for)``: the highest of :data:`X86_ISAS` the CPU has, and that capped by
    ``--xla_cpu_max_isa`` in ``XLA_FLAGS`` (XLA otherwise targets the host). Other architectures: the machine name
    for both."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = set(cpuinfo.get("flags", "").split())
    levels = [name for name, flag in X86_ISAS if flag in flags]
    if not levels:
        return platform.machine(), platform.machine()
    host = levels[-1]
    xla_flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    cap = re.search(r"--xla_cpu_max_isa=(\w+)", xla_flags)
    names = [name for name, _ in X86_ISAS]
    if cap and cap.group(1).upper() in names:
        return host, names[min(names.index(host), names.index(cap.group(1).upper()))]
    return host, host


def _gpu_info() -> dict[str, Any] | None:
    """GPU model, count, the runtime's platform version (CUDA/ROCm) and the NVIDIA driver, on a GPU backend."""
    if jax.default_backend() != "gpu":
        return None
    devices = jax.devices()
    info: dict[str, Any] = {"model": devices[0].device_kind, "count": len(devices),
                            "platform_version": getattr(devices[0].client, "platform_version", None), "driver": None}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def machine() -> dict[str, Any]:
    """The hardware a number was made on: CPU model, its ISA and the ISA XLA compiled for (floating-point results
    can differ between ISAs), and GPU model/driver/CUDA where present. ``label`` is the one-line form."""
    cpuinfo = _cpuinfo()
    model = cpuinfo.get("model name") or platform.processor() or platform.machine()
    host, xla = cpu_isa(cpuinfo)
    info = {"cpu_model": model, "cpu_isa_host": host, "cpu_isa_xla": xla, "cpu_count": os.cpu_count(),
            "gpu": _gpu_info()}
    gpu = info["gpu"]
    info["label"] = f"{model} ({xla})" + (f" + {gpu['count']}x {gpu['model']}" if gpu else "")
    return info


def provenance(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What is needed to trace a result back to the exact command, software and hardware."""
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
        "machine": machine(),
        **(extra or {}),
    }


class RunDir:
    """A run's working directory: config, provenance and metrics, written by process 0 only."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir)
        self.is_writer = jax.process_index() == 0
        self._tb = None
        self._wandb = None
        self._tracking: dict[str, Any] = {"tensorboard": True, "wandb": False}
        self._config: dict[str, Any] = {}
        self._purge_step: int | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.path.resolve() / "checkpoints"

    def check_same_config(self, config: ml_collections.ConfigDict) -> None:
        """A workdir holds one experiment: refuse to continue it with a different config. Keys added to the base
        config after the run was saved count as their defaults (a run from before ``augment`` existed resumes)."""
        path = self.path / CONFIG_FILE
        if not path.exists():
            return
        saved = flatten(config_lib.to_dict(config_lib.saved_config(read_json(path))))
        current = flatten(config_lib.to_dict(config))
        diff = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        if diff:
            changes = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:5])
            raise ConfigError(f"workdir {self.path} holds a run with a different config ({changes}); "
                              "use a new --workdir, or the same config to resume")

    def start(self, config: ml_collections.ConfigDict, extra: dict[str, Any] | None = None) -> None:
        """Writes config.json and run.json and sets up the writers ``config.tracking`` asks for."""
        if not self.is_writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._config = config_lib.to_dict(config)
        self._tracking = dict(self._config["tracking"])
        write_json_atomic(self.path / CONFIG_FILE, self._config)
        write_json_atomic(self.path / RUN_FILE, provenance(extra))

    def update_run_info(self, **fields: Any) -> None:
        if not self.is_writer:
            return
        info = read_json(self.path / RUN_FILE)
        info.update(fields)
        write_json_atomic(self.path / RUN_FILE, info)

    def log(self, kind: str | None = None, **metrics: Any) -> None:
        """Appends one strict-JSON line with its ``kind`` (inferred from the keys when not given; flushed, so a
        crash loses at most the line being written) and, when it has a ``step``, writes its numeric values to
        TensorBoard (grouped tags) and W&B."""
        if not self.is_writer:
            return
        record = {k: _to_python(v) for k, v in metrics.items()}
        kind = kind or record_kind(record)
        if kind not in KINDS:
            raise ValueError(f"unknown metrics kind {kind!r}; use one of {KINDS}")
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(json.dumps({"kind": kind, **strict_record(record)}, sort_keys=True, allow_nan=False) + "\n")
            f.flush()
        if "step" in record:
            scalars = {tensorboard_tag(k, kind): v for k, v in record.items()
                       if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
                       and (k != "epoch" or kind == "train")}  # epoch once per step, with the train metrics
            self._write_scalars(scalars, record["step"])

    def log_final(self, step: int, summary: dict[str, Any], image: Path | None = None) -> None:
        """The end of a run in TensorBoard and W&B: the test metrics at ``step``, the hparams (flattened config)
        with the final metrics, and the confusion matrix ``image`` (a PNG)."""
        if not self.is_writer:
            return
        final = {tensorboard_tag(k, "summary"): v for k, v in summary.items()
                 if k.startswith("test_") and isinstance(v, int | float)}
        if summary.get("best_dev_accuracy") is not None:
            final["dev/best_accuracy"] = summary["best_dev_accuracy"]
        if summary.get("best_step") is not None:
            final["run/best_step"] = summary["best_step"]
        self._write_scalars({k: v for k, v in final.items() if k.startswith("test/")}, step)
        pixels = None
        if image is not None and Path(image).exists():
            import numpy as np
            from PIL import Image

            with Image.open(image) as im:
                pixels = np.asarray(im.convert("RGB"))
        if self._tracking["tensorboard"]:
            writer = self._tensorboard()
            if pixels is not None:
                writer.add_image("test/confusion_matrix", pixels, step, dataformats="HWC")
            writer.add_hparams(hparams(self._config), {f"hparam/{k}": float(v) for k, v in final.items()},
                               name="hparams", global_step=step)
            writer.flush()
        if self._tracking["wandb"]:
            run = self._wandb_run()
            run.summary.update(final)
            if pixels is not None:
                import wandb

                run.log({"test/confusion_matrix": wandb.Image(pixels)}, step=step)

    def _write_scalars(self, scalars: dict[str, float], step: int) -> None:
        if not scalars:
            return
        if self._tracking["tensorboard"]:
            writer = self._tensorboard()
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)  # queued for the writer's thread; see flush()
        if self._tracking["wandb"]:
            self._wandb_run().log(scalars, step=step)

    def flush(self) -> None:
        """Puts the TensorBoard events logged so far on disk. Called when a checkpoint is saved (so a run killed
        later resumes with every event up to its checkpoint; the ones after it are purged) and on close; between
        those, tensorboardX's writer thread writes them in the background (a flush per line cost more main-thread
        time than the line itself: ``scripts/bench_train.py --profile``)."""
        if self._tb is not None:
            self._tb.flush()

    def _tensorboard(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter

            # after a resume, purge what a killed run wrote past its last checkpoint
            self._tb = SummaryWriter(str(self.path / TENSORBOARD_DIR), flush_secs=30, purge_step=self._purge_step)
        return self._tb

    def _wandb_run(self):
        if self._wandb is None:
            import wandb

            t = self._tracking
            run_id = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]  # the same run on resume
            self._wandb = wandb.init(project=t["wandb_project"], mode=t["wandb_mode"], dir=str(self.path),
                                     name=self.path.name, id=run_id, resume="allow", config=self._config)
        return self._wandb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def truncate_metrics(self, after_step: int) -> None:
        """Drops metric lines logged after ``after_step`` (by a run that died before its next checkpoint) and any
        summary line; the TensorBoard writer then purges that run's events from ``after_step + 1`` on."""
        if not self.is_writer:
            return
        self._purge_step = after_step + 1
        path = self.path / METRICS_FILE
        kept = [r for r in read_metrics(self.path)  # a summary is the end's: a resumed (or rerun) run writes its own
                if r.get("step", 0) <= after_step and r.get("kind") != "summary"]
        with atomic_write(path) as f:
            f.writelines(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in kept)


def hparams(config: dict[str, Any]) -> dict[str, Any]:
    """A config as TensorBoard hparams: flattened, values int/float/str/bool (sequences and None as text)."""
    out = {}
    for key, value in flatten(config).items():
        out[key] = value if isinstance(value, int | float | str | bool) else json.dumps(value)
    return out


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
