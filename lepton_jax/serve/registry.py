"""The model registry, kept in the lake: named model versions whose parameters are stored in the lake with them.

Layout under a lake root ``ROOT`` (every key written through :mod:`lepton_jax.lake.storage`, so the registry lives
wherever the lake does)::

    ROOT/_models/<name>/00000001.json                 one record per version (immutable): the commit point
    ROOT/_models/<name>/_params/<params-id>/<leaf>/   that version's parameters: one zarr v3 array per leaf
    ROOT/_models/<name>/_stages/<stage>/00000001.json promotions and rollbacks, append-only; the highest number
                                                      is current (a gated promotion's entry keeps its comparison)

A record is self-sufficient: it holds the parameters' manifest (key, leaf paths/shapes/dtypes and a sha256 over the
tree, checked on load), the model's config (with a plug-in's import path), the input schema, the drift reference
statistics of the training split, the run's metrics, the lake table version it was trained on, and where it came
from (run directory + step, provenance only). ``serve``, ``export``, ``predict`` and ``eval`` of a registry
reference read nothing else, so they keep working after the run directory is moved or deleted.

Registering writes the parameters under a fresh ``_params/<params-id>`` (``<unix-ms>-<random>``) first and then
publishes the record with the lake's create-if-absent (:meth:`lepton_jax.lake.storage.Storage.create`, the same
path the lake's commits take), so two concurrent registrations never take the same version and a record never
points at parameters still being written. A crash in between leaves an unreferenced ``_params`` directory and no
record; :meth:`Registry.gc` (``lepton-jax registry gc``) removes those once they are older than a grace period.
Records of the first format (``lepton-model/1``, pointing at a run directory) still load while that directory exists.

Stages move by promotion, optionally gated (:meth:`Registry.promote` with ``if_better``: the candidate is compared
with the stage's holder on pinned data, :mod:`lepton_jax.serve.gate`), and by rollback (:meth:`Registry.rollback`);
each is one entry published with the same create-if-absent at the next sequence number, so concurrent writers never
lose or reorder an entry.

References: ``name`` (latest version), ``name@3``, ``name@latest``, ``name@<stage>`` (e.g. ``name@production``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import uuid
from pathlib import Path
from typing import Any

from lepton_jax.errors import RegistryError  # noqa: F401 (re-exported: its home was here)

MODELS_DIR = "_models"
STAGES_DIR = "_stages"
PARAMS_DIR = "_params"
FORMAT = "lepton-model/2"
FORMAT_V1 = "lepton-model/1"  # parameters in the training run's checkpoints (read while the run exists)
FORMATS = (FORMAT_V1, FORMAT)
MIN_GC_GRACE_SECONDS = 60.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PARAMS_ID = re.compile(r"^(\d{13})-[0-9a-f]{12}$")
TEMP_PREFIX = ".publish-"  # + <unix-ms>- + random: a record's temp file where the backend needs one (local disk)
_TEMP = re.compile(r"^\.publish-(\d{13})-")
_MAX_RETRIES = 64


class PromotionRefused(RegistryError):
    """A gated promotion found the candidate worse than the stage's holder by more than the tolerance; nothing was
    written. ``comparison`` is the gate's record (:meth:`Registry.compare`)."""

    def __init__(self, message: str, comparison: dict[str, Any]):
        super().__init__(message)
        self.comparison = comparison


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name or name == "latest":
        raise RegistryError(f"invalid {kind} {name!r}: use letters, digits, '_', '-', '.' (no separators, "
                            "not 'latest')")
    return name


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """One registered model version: its record, as published, and the lake storage it was read from."""

    record: dict[str, Any]
    storage: Any = dataclasses.field(default=None, compare=False, repr=False)

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
        """The training run it was registered from (provenance; not needed to load a self-sufficient record)."""
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

    @property
    def self_sufficient(self) -> bool:
        """True when the parameters are stored in the lake with the record."""
        return "params" in self.record

    def restore(self, mesh: Any) -> tuple[Any, Any]:
        """``(built, params)``: the model rebuilt from the record's config on ``mesh`` (replicated) and its
        parameters, read from the lake and checked against the record's sha256."""
        from lepton_jax.config import saved_config
        from lepton_jax.parallel.build import build
        from lepton_jax.serve.lake_params import read_tree

        if not self.self_sufficient:
            return self._restore_from_run(mesh)
        built = build(saved_config(self.record["config"]), self.schema, mesh, replicate=True)
        params = read_tree(self.storage, self.record["params"], built.abstract_params, what=f"model {self.ref}")
        return built, params

    def _restore_from_run(self, mesh: Any) -> tuple[Any, Any]:
        """A first-format record: the parameters are still only in the run directory's checkpoints."""
        from lepton_jax.checkpoint import restore_params

        if not (self.workdir / "checkpoints").is_dir():
            raise RegistryError(f"model {self.ref} is an older registry record whose parameters live in run directory "
                                f"{self.workdir}, which is gone; re-register the model (`lepton-jax registry "
                                "register`) to store its parameters in the lake")
        built, params, _ = restore_params(self.workdir, self.step, mesh)
        return built, params


class Registry:
    """Named, versioned models under ``<lake>/_models``."""

    def __init__(self, lake_root: str | Path):
        from lepton_jax.lake.storage import open_storage

        self.lake_root = lake_root
        self.storage = open_storage(lake_root)
        self.uri = f"{str(self.storage.uri).rstrip('/')}/{MODELS_DIR}"

    def names(self) -> list[str]:
        """The registered model names (a LakeError if the lake itself does not exist)."""
        self._require_lake()
        return self._names()

    def _names(self) -> list[str]:
        return [n for n in self.storage.list(f"{MODELS_DIR}/") if _NAME.match(n)]

    def _require_lake(self) -> None:
        from lepton_jax.lake import Lake

        Lake(self.lake_root).require()

    def versions(self, name: str) -> list[int]:
        names = self.storage.list(f"{MODELS_DIR}/{check_name('model name', name)}/")
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """Version ``version`` of ``name`` (default: the latest)."""
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise RegistryError(f"registry {self.uri} has no model {name!r} (models: {known}); register one with "
                                f"`lepton-jax registry register --lake {self.lake_root} --name {name} --workdir ...`")
        version = versions[-1] if version is None else int(version)
        if version not in versions:
            raise RegistryError(f"model {name!r} has no version {version}; versions: {versions}")
        key = self._record_key(name, version)
        record = self._read_json(key)
        if not isinstance(record, dict) or record.get("format") not in FORMATS or record.get("version") != version:
            raise RegistryError(f"registry record {self.storage.uri}/{key} is not a {FORMAT} record for version "
                                f"{version}; re-register the model")
        return ModelVersion(record, self.storage)

    def resolve(self, ref: str) -> ModelVersion:
        """``name``, ``name@<version>``, ``name@latest`` or ``name@<stage>`` -> the model version."""
        name, _, tag = ref.partition("@")
        if not tag or tag == "latest":
            return self.get(name)
        if tag.isdigit():
            return self.get(name, int(tag))
        stages = self.stages(name)
        if tag not in stages:
            if not stages:
                self._require_lake()
            raise RegistryError(f"model {name!r} has no version at stage {tag!r}; stages: "
                                f"{stages or 'none'}; promote one with `lepton-jax registry promote`")
        return self.get(name, stages[tag])

    def stages(self, name: str) -> dict[str, int]:
        """Current stage -> version of ``name``."""
        prefix = f"{MODELS_DIR}/{check_name('model name', name)}/{STAGES_DIR}"
        out = {}
        for stage in self.storage.list(f"{prefix}/"):
            entries = self._sequence(f"{prefix}/{stage}")
            if entries:
                out[stage] = int(self._read_json(f"{prefix}/{stage}/{entries[-1]:08d}.json")["version"])
        return out

    def history(self, name: str, stage: str) -> list[dict[str, Any]]:
        prefix = f"{MODELS_DIR}/{check_name('model name', name)}/{STAGES_DIR}/{check_name('stage', stage)}"
        return [self._read_json(f"{prefix}/{n:08d}.json") for n in self._sequence(prefix)]

    def compare(self, name: str, version: int, stage: str = "production", *, split: str = "test",
                table_version: int | None = None, metric: str = "accuracy", tolerance: float = 0.0) -> dict[str, Any]:
        """``name@version`` against what ``stage`` holds now, on one split of a pinned table version (default: the
        candidate's training table at the version it was trained on), with ``lepton-jax eval``'s metric code: see
        :mod:`lepton_jax.serve.gate`. The comparison's ``decision`` is ``promote`` when the candidate is not worse by
        more than ``tolerance`` (or the stage holds nothing: ``incumbent`` is None), else ``refuse``."""
        from lepton_jax.serve.gate import Gate

        gate = Gate(self.get(name, version), split=split, table_version=table_version, metric=metric,
                    tolerance=tolerance)
        _, holder = self._stage_head(self._stage_prefix(name, stage))
        return gate.compare(None if holder is None else self.get(name, holder), stage)

    def promote(self, name: str, version: int, stage: str = "production", *, if_better: bool = False,
                tolerance: float = 0.0, split: str = "test", table_version: int | None = None,
                metric: str = "accuracy") -> dict[str, Any]:
        """Points ``stage`` at ``version``: appends an entry to the stage's history and returns it.

        With ``if_better`` the candidate is first compared with the stage's current holder (:meth:`compare`; the
        entry keeps the comparison) and :class:`PromotionRefused` is raised, with nothing written, when it is worse
        by more than ``tolerance``. The entry is published with create-if-absent at the sequence number after the
        holder it was compared with, so if another promotion lands first the comparison is made again against the
        new holder: a gated promotion is never decided against a stale incumbent."""
        from lepton_jax.serve.gate import PROMOTE, Gate, describe

        candidate = self.get(name, version)
        if not if_better and (tolerance or split != "test" or table_version is not None or metric != "accuracy"):
            raise RegistryError("a tolerance, split, table version or metric applies only to a gated promotion "
                                "(if_better / --if-better)")
        gate = Gate(candidate, split=split, table_version=table_version, metric=metric, tolerance=tolerance) \
            if if_better else None
        prefix = self._stage_prefix(name, stage)
        for _ in range(_MAX_RETRIES):
            seq, previous = self._stage_head(prefix)
            comparison = None
            if gate is not None:
                comparison = gate.compare(None if previous is None else self.get(name, previous), stage)
                if comparison["decision"] != PROMOTE:
                    raise PromotionRefused(f"refused to promote {describe(comparison, name)}; {stage} still holds "
                                           f"{name}@{previous}", comparison)
            entry = {"stage": stage, "version": candidate.version, "previous": previous, "time": time.time(),
                     "sequence": seq + 1, "rollback": False, "gated": gate is not None, "comparison": comparison}
            if self.storage.create(f"{prefix}/{seq + 1:08d}.json", _dumps(entry), temp_prefix=_temp_prefix()):
                return entry
        raise RegistryError(f"could not promote {name}@{version} to {stage}: too many concurrent promotions")

    def rollback(self, name: str, stage: str = "production", *, to: int | None = None) -> dict[str, Any]:
        """Restores the version ``stage`` held before its latest promotion still in effect; appends that as a new
        history entry (``rollback: true``, ``from``/``to``) and returns it.

        Rollbacks undo promotions like an undo stack: a second rollback undoes the promotion before that one, and a
        promotion after a rollback is undone first. Promotions that did not change the holder, and those of a version
        already rolled back from since the latest promotion, are skipped, so a rollback always changes the version
        and never restores one just rolled back from. ``to`` picks any earlier holder further down that stack
        (undoing every promotion after it). If the stage moves while the rollback is being published, nothing is
        written and a :class:`RegistryError` says so."""
        prefix = self._stage_prefix(name, stage)
        seen: int | None = None
        for _ in range(_MAX_RETRIES):
            entries = self._history_entries(prefix)
            if not entries:
                raise RegistryError(f"stage {stage!r} of model {name!r} holds no version: nothing to roll back")
            current = int(entries[-1][1]["version"])
            if seen is not None and current != seen:
                raise RegistryError(f"stage {stage!r} of model {name!r} moved from {name}@{seen} to {name}@{current} "
                                    "while rolling back: nothing was rolled back; check `registry history` and run "
                                    "it again if still wanted")
            seen = current
            rolled_back_from = set()  # by the rollbacks since the latest promotion: never restored again
            for _, earlier in reversed(entries):
                if not earlier.get("rollback"):
                    break
                rolled_back_from.add(int(earlier["from"]))
            restores, target = self._rollback_target(_undo_stack(entries), name, stage, current, to,
                                                     rolled_back_from)
            seq = entries[-1][0] + 1
            entry = {"stage": stage, "version": target, "previous": current, "time": time.time(), "sequence": seq,
                     "rollback": True, "from": current, "to": target, "restores": restores, "gated": False,
                     "comparison": None}
            if self.storage.create(f"{prefix}/{seq:08d}.json", _dumps(entry), temp_prefix=_temp_prefix()):
                return entry
        raise RegistryError(f"could not roll back {name} at {stage}: too many concurrent promotions")

    @staticmethod
    def _rollback_target(stack: list[tuple[int, int]], name: str, stage: str, current: int, to: int | None,
                         rolled_back_from: set[int]) -> tuple[int, int]:
        """``(sequence, version)`` of the promotion a rollback from ``current`` restores."""
        earlier = [(s, v) for s, v in stack if v != current]
        if to is None:
            candidates = [(s, v) for s, v in earlier if v not in rolled_back_from]
            if not candidates:
                skipped = f"; {', '.join(f'{name}@{v}' for v in sorted(rolled_back_from))} just rolled back from " \
                          "(restore with --to)" if earlier else ""
                raise RegistryError(f"stage {stage!r} of model {name!r} has no earlier version to roll back to (it "
                                    f"holds {name}@{current}{skipped}); promote one with `lepton-jax registry "
                                    "promote`")
            return candidates[-1]
        matches = [(s, v) for s, v in earlier if v == int(to)]
        if not matches:
            held = sorted({v for _, v in earlier})
            raise RegistryError(f"{name}@{to} is not an earlier holder of stage {stage!r} a rollback can restore "
                                f"(it holds {name}@{current}; earlier: {held or 'none'}); move the stage to any "
                                "version with `lepton-jax registry promote`")
        return matches[-1]

    def _stage_prefix(self, name: str, stage: str) -> str:
        self.get(name)  # the model exists (one line naming the known models if not)
        return f"{MODELS_DIR}/{name}/{STAGES_DIR}/{check_name('stage', stage)}"

    def _stage_head(self, prefix: str) -> tuple[int, int | None]:
        """``(sequence number, version)`` of a stage's latest history entry; ``(0, None)`` when it has none."""
        entries = self._sequence(prefix)
        if not entries:
            return 0, None
        return entries[-1], int(self._read_json(f"{prefix}/{entries[-1]:08d}.json")["version"])

    def _history_entries(self, prefix: str) -> list[tuple[int, dict[str, Any]]]:
        return [(n, self._read_json(f"{prefix}/{n:08d}.json")) for n in self._sequence(prefix)]

    def register(self, name: str, workdir: str | Path, *, step: int | None = None, description: str = "",
                 reference_split: str = "train") -> ModelVersion:
        """Registers a training run's checkpoint (default: its best) as the next version of ``name``: its
        parameters are copied into the lake first, then the record is published."""
        from lepton_jax.serve.lake_params import write_tree
        from lepton_jax.serve.predictor import Predictor

        check_name("model name", name)
        predictor = Predictor.from_workdir(Path(workdir), step=step)
        fields = describe_run(Path(workdir), predictor, reference_split=reference_split)
        params = write_tree(self.storage, self.new_params_key(name), predictor.params)
        return self.add(name, {"description": description, **fields, "params": params})

    def new_params_key(self, name: str) -> str:
        """A fresh key for a version's parameters (its id starts with the time, so ids sort by age)."""
        return f"{MODELS_DIR}/{check_name('model name', name)}/{PARAMS_DIR}/{int(time.time() * 1000):013d}-" \
               f"{uuid.uuid4().hex[:12]}"

    def add(self, name: str, fields: dict[str, Any]) -> ModelVersion:
        """Publishes ``fields`` as the next version of ``name``; concurrent callers get distinct versions."""
        check_name("model name", name)
        self._check_params_present(fields.get("params"))
        for _ in range(_MAX_RETRIES):
            versions = self.versions(name)
            version = (versions[-1] if versions else 0) + 1
            record = {**fields, "format": FORMAT, "name": name, "version": version, "time": time.time()}
            if self.storage.create(self._record_key(name, version), _dumps(record), temp_prefix=_temp_prefix()):
                return ModelVersion(record, self.storage)
        raise RegistryError(f"could not register {name} in {self.uri}/{name}: too many concurrent registrations")

    def _check_params_present(self, manifest: dict[str, Any] | None) -> None:
        """Right before the record is published: every stored leaf still exists (a `registry gc --force` with a short
        grace could have removed a slow registration's copy), so no record ever names missing parameters."""
        if not manifest:
            return
        missing = [i for i in range(len(manifest["leaves"]))
                   if not self.storage.exists(f"{manifest['key']}/{i:04d}/zarr.json")]
        if missing:
            raise RegistryError(f"the parameters copied to {manifest['key']} are gone ({len(missing)} of "
                                f"{len(manifest['leaves'])} arrays; removed by `registry gc`?): nothing was "
                                "registered, run the registration again")

    def gc(self, grace_seconds: float = 3600.0, *, force: bool = False, dry_run: bool = False) -> list[str]:
        """Removes parameter directories no record references and records' temp files (both left by a registration
        or promotion that crashed before it published) once they are older than ``grace_seconds``; returns their
        keys. Below
        :data:`MIN_GC_GRACE_SECONDS` only with ``force`` (a registration still copying could lose its parameters)."""
        from lepton_jax.serve.lake_params import delete_tree

        if not isinstance(grace_seconds, int | float) or not math.isfinite(grace_seconds) or grace_seconds < 0:
            raise RegistryError(f"registry gc: the grace period must be a number of seconds >= 0, got {grace_seconds}")
        if grace_seconds < MIN_GC_GRACE_SECONDS and not force:
            raise RegistryError(f"registry gc: a grace period under {MIN_GC_GRACE_SECONDS:g} s can delete the "
                                "parameters of a registration in progress; pass --force if none is running")
        from lepton_jax.lake.storage import storage_clock

        names = self._names()
        if not names:  # nothing to collect (a missing lake included), and the clock probe must not create the lake
            return []
        cutoff = storage_clock(self.storage) - grace_seconds  # the storage's clock against its own timestamps
        removed = []
        for name in names:
            base = f"{MODELS_DIR}/{name}"
            for prefix in [base] + [f"{base}/{STAGES_DIR}/{s}" for s in self.storage.list(f"{base}/{STAGES_DIR}/")]:
                for temp in self.storage.list(f"{prefix}/"):
                    found = self.storage.stat(f"{prefix}/{temp}") if _TEMP.match(temp) else None
                    if found is not None and found[1] <= cutoff:
                        if not dry_run:
                            self.storage.delete(f"{prefix}/{temp}")
                        removed.append(f"{prefix}/{temp}")
            ids = [i for i in self.storage.list(f"{base}/{PARAMS_DIR}/") if _PARAMS_ID.match(i)]
            if not ids:
                continue
            used = {self.get(name, v).record.get("params", {}).get("key") for v in self.versions(name)}
            for params_id in ids:
                key = f"{MODELS_DIR}/{name}/{PARAMS_DIR}/{params_id}"
                found = None if key in used else self.storage.tree(key)
                if found is None or found[1] > cutoff:  # referenced, gone, or written to within the grace
                    continue
                if self.storage.list(f"{key}/"):  # (a removed copy leaves an empty directory on local disk)
                    if not dry_run:
                        delete_tree(self.storage, key)
                    removed.append(key)
        return removed

    def _read_json(self, key: str) -> Any:
        try:
            return json.loads(self.storage.read(key))
        except (OSError, ValueError) as e:
            raise RegistryError(f"registry record {self.storage.uri}/{key} is unreadable ({e})") from e

    def _sequence(self, prefix: str) -> list[int]:
        return sorted(int(n[:-5]) for n in self.storage.list(f"{prefix}/") if n.endswith(".json") and n[:-5].isdigit())

    @staticmethod
    def _record_key(name: str, version: int) -> str:
        return f"{MODELS_DIR}/{name}/{version:08d}.json"


def describe_run(workdir: Path, predictor: Any, *, reference_split: str = "train") -> dict[str, Any]:
    """What a registry record says about a run and the checkpoint ``predictor`` holds: its provenance, metrics,
    config, model, data version, input schema and drift reference."""
    import jax

    from lepton_jax import tracking
    from lepton_jax.data.transforms import input_array, input_spec
    from lepton_jax.lake import Lake
    from lepton_jax.plugins import is_import_path
    from lepton_jax.serve.drift import reference_stats
    from lepton_jax.serve.predictor import read_run

    workdir = workdir.resolve()
    config, run_info = read_run(workdir)
    data = run_info["data"]
    summary_path = workdir / "summary.json"
    metrics = tracking.read_json(summary_path) if summary_path.exists() else {}
    split = Lake(data["lake"]).table(data["table"], data["version"]).reader(reference_split).read_all()
    raw = split[input_array(data["schema"])]
    outputs = predictor.logits(raw, name=f"{data['table']}@{data['version']}/{reference_split}")
    predicted, num_buckets = predictor.task.drift_classes(outputs)  # regression: inputs only (one bucket)
    schema = data["schema"]
    spec = input_spec(schema)
    reference = reference_stats(raw, predicted, num_classes=num_buckets,
                                value_range=spec["value_range"], split=reference_split,
                                column_ranges=spec.get("column_ranges"), columns=spec.get("columns"))
    model_name = str(config.model.name)
    return {
        "checkpoint": {"workdir": str(workdir), "directory": str(workdir / "checkpoints"), "step": predictor.step,
                       "note": "provenance only: the parameters are stored in the lake (params)"},
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float | str | None)},
        "config": config.to_dict(),
        "model": {"name": model_name, "plugin": model_name if is_import_path(model_name) else None,
                  "num_params": int(sum(leaf.size for leaf in jax.tree.leaves(predictor.params)))},
        "data": {"lake": data["lake"], "table": data["table"], "version": data["version"], "schema": schema,
                 "source_sha256": data.get("source_sha256")},
        "input": {"name": input_array(schema), "example_shape": list(predictor.example_shape),
                  "value_range": spec["value_range"], "label_names": predictor.label_names,
                  **({"column_ranges": spec["column_ranges"]} if "column_ranges" in spec else {})},
        "reference": reference,
        "git_revision": run_info.get("git_revision"),
        "lineage": run_info.get("lineage"),  # parent model (and its table version) when fine-tuned; this run's table
    }


def _undo_stack(entries: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, int]]:
    """The promotions still in effect, oldest first, as ``(sequence, version)``: each promotion pushes, each rollback
    pops down to the promotion it restored."""
    stack: list[tuple[int, int]] = []
    for seq, entry in entries:
        if entry.get("rollback"):
            while stack and stack[-1][0] != entry["restores"]:
                stack.pop()
            if not stack:  # (the restored promotion is not on the stack: start again from the restored holder)
                stack.append((int(entry["restores"]), int(entry["version"])))
        else:
            stack.append((seq, int(entry["version"])))
    return stack


def _temp_prefix() -> str:
    return f"{TEMP_PREFIX}{int(time.time() * 1000):013d}-"


def _dumps(record: dict[str, Any]) -> bytes:
    return json.dumps(record, indent=1, sort_keys=True, default=str).encode()
