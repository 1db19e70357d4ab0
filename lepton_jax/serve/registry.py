"""The model registry, kept in the lake: named model versions that point at Orbax checkpoints.

Layout under a lake root ``ROOT``::

    ROOT/_models/<name>/00000001.json                 one record per version (immutable)
    ROOT/_models/<name>/_stages/<stage>/00000001.json promotions, append-only; the highest number is current

A record holds the checkpoint (run directory + step), the run's metrics and config, the lake table version it was
trained on, the input schema, and the reference statistics of the training split for drift monitoring. Records
and promotions are published like lake commits: an fsynced temp file is ``os.link``-ed to its final name, an
exclusive create, so two concurrent registrations can never take the same version.

References: ``name`` (latest version), ``name@3``, ``name@latest``, ``name@<stage>`` (e.g. ``name@production``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

from lepton_jax.errors import LeptonError

MODELS_DIR = "_models"
STAGES_DIR = "_stages"
FORMAT = "lepton-model/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MAX_RETRIES = 64


class RegistryError(LeptonError):
    """A model name, version or stage is invalid or unknown."""


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name or name == "latest":
        raise RegistryError(f"invalid {kind} {name!r}: use letters, digits, '_', '-', '.' (no separators, "
                            "not 'latest')")
    return name


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """One registered model version: its record, as published."""

    record: dict[str, Any]

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def version(self) -> int:
        return int(self.record["version"])

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def workdir(self) -> Path:
        return Path(self.record["checkpoint"]["workdir"])

    @property
    def step(self) -> int:
        return int(self.record["checkpoint"]["step"])

    @property
    def schema(self) -> dict[str, Any]:
        return self.record["data"]["schema"]

    @property
    def reference(self) -> dict[str, Any] | None:
        return self.record.get("reference")


class Registry:
    """Named, versioned models under ``<lake>/_models``."""

    def __init__(self, lake_root: str | Path):
        from lepton_jax.lake.uri import local_root

        self.lake_root = local_root(lake_root)
        self.root = self.lake_root / MODELS_DIR

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def versions(self, name: str) -> list[int]:
        directory = self.root / check_name("model name", name)
        if not directory.is_dir():
            return []
        return sorted(int(p.stem) for p in directory.glob("*.json") if p.stem.isdigit())

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """Version ``version`` of ``name`` (default: the latest)."""
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise RegistryError(f"registry {self.root} has no model {name!r} (models: {known}); register one with "
                                f"`lepton-jax registry register --lake {self.lake_root} --name {name} --workdir ...`")
        version = versions[-1] if version is None else int(version)
        if version not in versions:
            raise RegistryError(f"model {name!r} has no version {version}; versions: {versions}")
        path = self._record_path(name, version)
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RegistryError(f"registry record {path} is unreadable ({e})") from e
        if record.get("format") != FORMAT or record.get("version") != version:
            raise RegistryError(f"registry record {path} is not a {FORMAT} record for version {version}")
        return ModelVersion(record)

    def resolve(self, ref: str) -> ModelVersion:
        """``name``, ``name@<version>``, ``name@latest`` or ``name@<stage>`` -> the model version."""
        name, _, tag = ref.partition("@")
        if not tag or tag == "latest":
            return self.get(name)
        if tag.isdigit():
            return self.get(name, int(tag))
        stages = self.stages(name)
        if tag not in stages:
            raise RegistryError(f"model {name!r} has no version at stage {tag!r}; stages: "
                                f"{stages or 'none'}; promote one with `lepton-jax registry promote`")
        return self.get(name, stages[tag])

    def stages(self, name: str) -> dict[str, int]:
        """Current stage -> version of ``name``."""
        directory = self.root / check_name("model name", name) / STAGES_DIR
        out = {}
        for stage_dir in sorted(directory.iterdir()) if directory.is_dir() else []:
            entries = sorted(p for p in stage_dir.glob("*.json") if p.stem.isdigit())
            if entries:
                out[stage_dir.name] = int(json.loads(entries[-1].read_text())["version"])
        return out

    def history(self, name: str, stage: str) -> list[dict[str, Any]]:
        directory = self.root / check_name("model name", name) / STAGES_DIR / check_name("stage", stage)
        return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json")) if p.stem.isdigit()]

    def promote(self, name: str, version: int, stage: str = "production") -> dict[str, Any]:
        """Points ``stage`` at ``version`` (appends to the stage's history)."""
        self.get(name, version)
        directory = self.root / name / STAGES_DIR / check_name("stage", stage)
        for _ in range(_MAX_RETRIES):
            entries = sorted(int(p.stem) for p in directory.glob("*.json") if p.stem.isdigit())
            seq = (entries[-1] if entries else 0) + 1
            previous = self.stages(name).get(stage)
            entry = {"stage": stage, "version": int(version), "previous": previous, "time": time.time(),
                     "sequence": seq}
            if _publish(directory / f"{seq:08d}.json", entry):
                return entry
        raise RegistryError(f"could not promote {name}@{version} to {stage}: too many concurrent promotions")

    def register(self, name: str, workdir: str | Path, *, step: int | None = None, description: str = "",
                 reference_split: str = "train") -> ModelVersion:
        """Registers a training run's checkpoint (default: its best) as the next version of ``name``."""
        check_name("model name", name)
        fields = describe_run(Path(workdir), step=step, reference_split=reference_split)
        return self.add(name, {"description": description, **fields})

    def add(self, name: str, fields: dict[str, Any]) -> ModelVersion:
        """Publishes ``fields`` as the next version of ``name``; concurrent callers get distinct versions."""
        check_name("model name", name)
        for _ in range(_MAX_RETRIES):
            versions = self.versions(name)
            version = (versions[-1] if versions else 0) + 1
            record = {**fields, "format": FORMAT, "name": name, "version": version, "time": time.time()}
            if _publish(self._record_path(name, version), record):
                return ModelVersion(record)
        raise RegistryError(f"could not register {name} in {self.root / name}: too many concurrent registrations")

    def _record_path(self, name: str, version: int) -> Path:
        return self.root / name / f"{version:08d}.json"


def describe_run(workdir: Path, *, step: int | None = None, reference_split: str = "train") -> dict[str, Any]:
    """What a registry record says about a run: checkpoint, metrics, config, data, schema, drift reference."""
    from lepton_jax import tracking
    from lepton_jax.data.transforms import input_array, input_spec
    from lepton_jax.lake import Lake
    from lepton_jax.serve.drift import reference_stats
    from lepton_jax.serve.predictor import Predictor, read_run

    workdir = workdir.resolve()
    config, run_info = read_run(workdir)
    predictor = Predictor.from_workdir(workdir, step=step)
    data = run_info["data"]
    summary_path = workdir / "summary.json"
    metrics = tracking.read_json(summary_path) if summary_path.exists() else {}
    split = Lake(data["lake"]).table(data["table"], data["version"]).reader(reference_split).read_all()
    raw = split[input_array(data["schema"])]
    predicted = predictor.predict(raw, name=f"{data['table']}@{data['version']}/{reference_split}")["class"]
    schema = data["schema"]
    spec = input_spec(schema)
    reference = reference_stats(raw, predicted, num_classes=len(schema["label_names"]),
                                value_range=spec["value_range"], split=reference_split,
                                column_ranges=spec.get("column_ranges"), columns=spec.get("columns"))
    return {
        "checkpoint": {"workdir": str(workdir), "directory": str(workdir / "checkpoints"), "step": predictor.step},
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float | str | None)},
        "config": config.to_dict(),
        "data": {"lake": data["lake"], "table": data["table"], "version": data["version"], "schema": schema,
                 "source_sha256": data.get("source_sha256")},
        "input": {"name": input_array(schema), "example_shape": list(predictor.example_shape),
                  "value_range": spec["value_range"], "label_names": predictor.label_names,
                  **({"column_ranges": spec["column_ranges"]} if "column_ranges" in spec else {})},
        "reference": reference,
        "git_revision": run_info.get("git_revision"),
    }


def _publish(path: Path, record: dict[str, Any]) -> bool:
    """Exclusive create of ``path`` with ``record``: False if another writer published it first (the lake's
    publishing, :func:`lepton_jax.lake.publish.publish_new`)."""
    from lepton_jax.lake.publish import publish_new

    return publish_new(path, json.dumps(record, indent=1, sort_keys=True, default=str).encode())
