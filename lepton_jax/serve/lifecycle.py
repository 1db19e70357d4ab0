"""A server's model lifecycle: load, warm up, follow a registry stage, swap versions, canary and shadow.

A :class:`ServedModel` is one model version with its input schema; a :class:`Deployment` is a version in service:
its replicas, dynamic batcher and drift monitor. A :class:`Lifecycle` holds a server's deployments -- per model one
*stable* one, optionally a *canary* (``ServeConfig.canary = "STAGE:PERCENT"``: that share of requests, chosen by
a deterministic weighted round robin, is answered by the version at STAGE) and a *shadow* (``ServeConfig.shadow =
"STAGE"``: every answered request is mirrored to the version at STAGE in the background; its top-1 agreement with
the answer is counted, it never answers) -- and the HTTP app asks it which deployment takes a request.

Following a stage (``ServeConfig.follow``): one background task per followed (model, stage) polls the registry every
``follow_interval_s`` on a worker thread (a registry on an object store is read there too), so the event loop never
waits for it. When the stage points at another version, that version is loaded from the lake (digests checked),
checked against the served input spec and label names, its replicas are built and every batch bucket is compiled
and run once -- all on a worker thread while the old version keeps serving (a model with the same architecture
reuses the compiled function: only the parameters change). The swap is one assignment on the event loop, between
batches: a request that already holds the old deployment finishes on it and is answered with its version
(``model_version``); the old deployment then drains (its batcher finishes what it queued) and stops. Readiness
never changes. A version that cannot be served (stored parameters corrupt or missing, a changed input spec or label
set) is refused with one warning line and counted (``lepton_model_swaps_failed_total``); the old version keeps
serving and the refused version is not tried again (an unexpected error, e.g. the object store not answering, is
retried after :data:`RETRY_AFTER_S`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lepton_jax.data.transforms import input_array, input_bounds, input_spec, scale
from lepton_jax.errors import LeptonError
from lepton_jax.serve.batcher import BatchInfo, DynamicBatcher, Replica, bucket_sizes
from lepton_jax.serve.drift import DriftMonitor
from lepton_jax.serve.kserve import InferRequest, InputSpec, RequestError, Tensor
from lepton_jax.serve.metrics import ServerMetrics
from lepton_jax.serve.settings import ServeConfig
from lepton_jax.tasks import Classification, Task

log = logging.getLogger("lepton_jax.serve")

JSON_BYTES_PER_VALUE = 25  # the longest JSON float ("-1.2345678901234567e-05") and its separator ", "
RETRY_AFTER_S = 60.0  # a version that failed to load for an unexpected reason (not a LeptonError) is tried again
# a swapped-out version waits this long at most for the requests that took it (each of their stages -- body read,
# decode, queue -- is bounded by the server's own timeouts, so they end well before); a shutdown stops the wait
RETIRE_WAIT_S = 600.0
ROLES = ("stable", "canary", "shadow")


class SwapError(LeptonError):
    """A version cannot replace the one being served (a changed input spec or label set), or a bad canary/shadow
    setting."""


class ServedModel:
    """A model's parameters, input schema and drift reference, with one replica per device."""

    def __init__(self, name: str, version: str, graphdef: Any, params: Any, schema: dict[str, Any], *,
                 reference: dict[str, Any] | None = None, info: dict[str, Any] | None = None,
                 task: Task | None = None):
        self.name, self.version, self.schema = name, str(version), schema
        self.task = Classification(schema) if task is None else task  # what the outputs mean (lepton_jax.tasks)
        self.classifier = isinstance(self.task, Classification)
        self.graphdef, self.params = graphdef, jax.device_get(params)
        self.reference, self.info = reference, dict(info or {})
        spec = self.input_spec = input_spec(schema)
        self.example_shape = tuple(spec["example_shape"])
        self.value_range = tuple(float(v) for v in spec["value_range"])
        self.label_names = list(schema["label_names"])
        self.input_name = input_array(schema)  # the request field: the lake array's name
        self.lake_root: str | None = None  # set when loaded from a registry: where to follow its stage

    @classmethod
    def from_registry(cls, lake_root: str | Path, ref: str) -> ServedModel:
        """``name@version`` / ``name@production`` from the registry in ``lake_root``."""
        from lepton_jax.serve.predictor import Predictor
        from lepton_jax.serve.registry import Registry

        entry = Registry(lake_root).resolve(ref)
        stage = ref.partition("@")[2]
        predictor = Predictor.from_registry(entry, devices=jax.devices()[:1])
        model = cls(entry.name, str(entry.version), predictor.graphdef, predictor.params, predictor.schema,
                    reference=entry.reference, info={"step": entry.step, "source_workdir": str(entry.workdir)},
                    task=predictor.task)
        model.info.update({"registry": entry.ref, "requested": ref, "stage": stage if not stage.isdigit() else None,
                           "metrics": entry.record.get("metrics", {}),
                           "data": {k: entry.record["data"][k] for k in ("table", "version")}})
        model.lake_root = str(lake_root)
        return model

    @classmethod
    def from_workdir(cls, workdir: str | Path, *, name: str, version: str = "1", step: int | None = None,
                     reference: dict[str, Any] | None = None) -> ServedModel:
        from lepton_jax.serve.predictor import Predictor

        predictor = Predictor.from_workdir(workdir, step=step, devices=jax.devices()[:1])
        return cls(name, version, predictor.graphdef, predictor.params, predictor.schema, reference=reference,
                   info={"workdir": str(Path(workdir).resolve()), "step": predictor.step}, task=predictor.task)

    @functools.cached_property
    def probabilities(self) -> Any:
        """The jitted ``(params, raw rows) -> class probabilities`` (the task's served array: regression values)
        (compiled once per bucket and device)."""
        from lepton_jax.models.functional import make_predict

        apply = make_predict(self.graphdef)
        transform = self.task.serve_transform  # classification: softmax of the float32 logits
        lo, hi = input_bounds(self.input_spec)  # per column for tabular tables (data.transforms, as in training)

        @jax.jit
        def probabilities(params, raw):
            return transform(apply(params, scale(raw, lo, hi)))
        return probabilities

    def share_compiled(self, other: ServedModel) -> bool:
        """Takes ``other``'s compiled function when both have the same architecture and input scaling (a new
        version of a model: only the parameters differ, so nothing compiles again); True if it did."""
        same_params = jax.tree.structure(self.params) == jax.tree.structure(other.params) and all(
            a.shape == b.shape and a.dtype == b.dtype
            for a, b in zip(jax.tree.leaves(self.params), jax.tree.leaves(other.params), strict=True))
        if same_params and self.graphdef == other.graphdef and self.input_spec == other.input_spec:
            self.__dict__["probabilities"] = other.probabilities
            return True
        return False

    def make_replicas(self, count: int, devices: Sequence[Any] | None = None) -> list[Replica]:
        """``count`` replicas on ``devices`` (default: all), round robin when there are fewer devices."""
        devices = list(devices or jax.devices())
        if count > len(devices):
            log.warning("%d replicas of %s on %d device(s): replicas share devices round robin%s", count, self.name,
                        len(devices), " (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N before "
                        "start-up gives N devices)" if devices[0].platform == "cpu" else "")
        probabilities = self.probabilities
        replicas = []
        for i in range(count):
            device = devices[i % len(devices)]
            params = jax.device_put(self.params, device)

            def run(rows: np.ndarray, params=params, device=device) -> np.ndarray:
                return np.asarray(probabilities(params, jax.device_put(rows, device)))

            replicas.append(Replica(f"{i}:{device.platform}{device.id}", run))
        return replicas

    def incompatibility(self, candidate: ServedModel) -> str | None:
        """Why ``candidate`` cannot take this model's place for the same clients (None if it can): its input (name,
        shape, value ranges, columns) or its label names differ."""
        mine, theirs = self.spec, candidate.spec
        for field in ("input_name", "example_shape", "value_range", "column_ranges", "columns"):
            if getattr(mine, field) != getattr(theirs, field):
                return f"its input {field} {getattr(theirs, field)} differs from the served {getattr(mine, field)}"
        if candidate.task.name != self.task.name:
            return f"its task {candidate.task.name!r} differs from the served {self.task.name!r}"
        if candidate.label_names != self.label_names:
            return f"its label names {candidate.label_names} differ from the served {self.label_names}"
        return None

    @property
    def cells(self) -> int:
        return math.prod(self.example_shape)

    def metadata(self) -> dict[str, Any]:
        """KServe v2 model metadata."""
        return {"name": self.name, "versions": [self.version], "platform": f"jax_{jax.default_backend()}",
                "inputs": [{"name": self.input_name, "datatype": "FP32", "shape": [-1, *self.example_shape]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.label_names)]},
                            {"name": "class", "datatype": "INT64", "shape": [-1]},
                            {"name": "label", "datatype": "BYTES", "shape": [-1]}] if self.classifier else
                           [{"name": n, "datatype": "FP32", "shape": [-1, *self.task.output_shape]}
                            for n in self.task.output_names],
                "parameters": {"label_names": self.label_names, "value_range": list(self.value_range),
                               **({"column_ranges": self.input_spec["column_ranges"]}
                                  if "column_ranges" in self.input_spec else {}),
                               "units": "raw values of the training lake table", **self.info}}

    def config(self, serve: ServeConfig) -> dict[str, Any]:
        """Triton-style model configuration (``GET /v2/models/{name}/config``); dims exclude the batch axis."""
        return {"name": self.name, "platform": f"jax_{jax.default_backend()}", "backend": "lepton_jax",
                "version_policy": {"specific": {"versions": [self.version]}},
                "max_batch_size": min(serve.max_request_rows, serve.max_queue_rows),
                "input": [{"name": self.input_name, "data_type": "TYPE_FP32", "format": "FORMAT_NONE",
                           "dims": list(self.example_shape)}],
                "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [len(self.label_names)],
                            "label_filename": ""},
                           {"name": "class", "data_type": "TYPE_INT64", "dims": [1], "reshape": {"shape": []}},
                           {"name": "label", "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}}]
                if self.classifier else [{"name": n, "data_type": "TYPE_FP32", "dims": list(self.task.output_shape)}
                                         for n in self.task.output_names],
                "dynamic_batching": {"preferred_batch_size": bucket_sizes(serve.max_batch_size),
                                     "max_queue_delay_microseconds": int(serve.max_delay_ms * 1000),
                                     "default_queue_policy": {"max_queue_size": serve.max_queue_rows,
                                                              "default_timeout_microseconds":
                                                                  int(serve.request_timeout_s * 1e6)}},
                "instance_group": [{"name": f"{self.name}_0", "kind": f"KIND_{jax.default_backend().upper()}",
                                    "count": serve.replicas}],
                "parameters": {"value_range": {"string_value": f"{self.value_range[0]},{self.value_range[1]}"},
                               "label_names": {"string_value": ",".join(self.label_names)}}}

    def body_limit(self, serve: ServeConfig) -> int:
        """The request body limit: configured, or derived from the largest legal request as JSON."""
        if serve.max_body_bytes is not None:
            return int(serve.max_body_bytes)
        return min(serve.max_request_rows, serve.max_queue_rows) * self.cells * JSON_BYTES_PER_VALUE + (64 << 10)

    @functools.cached_property
    def _label_bytes(self) -> np.ndarray:
        labels = np.empty(len(self.label_names), object)
        labels[:] = [name.encode() for name in self.label_names]
        return labels

    @functools.cached_property
    def spec(self) -> InputSpec:
        columns = self.input_spec.get("column_ranges")
        return InputSpec(self.name, self.input_name, self.example_shape, self.value_range,
                         None if columns is None else tuple(tuple(float(v) for v in c) for c in columns),
                         tuple(self.input_spec["columns"]) if "columns" in self.input_spec else None)

    def rows(self, request: InferRequest, max_rows: int) -> np.ndarray:
        """The decoded request's input -> validated float32 rows ``(N, *example_shape)``."""
        return self.spec.rows(request, max_rows)

    def outputs(self, probabilities: np.ndarray) -> list[Tensor]:
        """The model's outputs for ``probabilities`` (N, C): probabilities, class index and label name (other tasks:
        their ``serve_outputs`` of the served array, e.g. regression's ``value``)."""
        if not self.classifier:
            return [Tensor(n, "FP32", list(a.shape), np.asarray(a, np.float32))
                    for n, a in self.task.serve_outputs(probabilities).items()]
        classes = probabilities.argmax(-1).astype(np.int64, copy=False)
        labels = self._label_bytes[classes]
        n = probabilities.shape[0]
        return [Tensor("probabilities", "FP32", list(probabilities.shape), probabilities.astype(np.float32)),
                Tensor("class", "INT64", [n], classes), Tensor("label", "BYTES", [n], labels)]


class Deployment:
    """A served model version with its batcher, drift monitor (stable role only) and limits.

    ``holders`` counts the requests that took this deployment and have not been answered yet; a retired deployment
    waits for them before its batcher drains."""

    def __init__(self, model: ServedModel, config: ServeConfig, metrics: ServerMetrics,
                 devices: Sequence[Any] | None, role: str = "stable"):
        self.model, self.role, self.metrics = model, role, metrics
        self.max_rows = min(config.max_request_rows, config.max_queue_rows)
        self.body_limit = model.body_limit(config)
        self.holders = 0
        name = model.name
        self.drift = None
        if model.reference and role == "stable":
            self.drift = DriftMonitor(model.reference, model=name, window=config.drift_window,
                                      window_s=config.drift_window_s, min_samples=config.drift_min_samples,
                                      threshold=config.drift_threshold, report=self._report_drift(metrics, name))
        self.on_batch = self._on_batch(metrics, name)
        self.batcher = DynamicBatcher(model.make_replicas(config.replicas, devices),
                                      max_batch_size=config.max_batch_size, max_delay_s=config.max_delay_ms / 1000,
                                      max_queue_rows=config.max_queue_rows, on_batch=self.on_batch)
        self.answered = metrics.version_requests.labels(name, model.version)
        self.inference_time = metrics.version_inference.labels(name, model.version)
        self._drift_task: asyncio.Task | None = None

    def start(self, drift_interval_s: float) -> None:
        """Starts the batcher (and drift task) on the running event loop and points the model's gauges here."""
        self.batcher.start()
        name, metrics = self.model.name, self.metrics
        metrics.model_version.labels(name, self.role).set(_version_number(self.model.version))
        if self.role != "stable":
            return
        metrics.queue_depth.labels(name).set_function(lambda: self.batcher.queued_rows)  # read when scraped
        for replica in self.batcher.replicas:
            metrics.replica_inflight.labels(name, replica.name).set_function(lambda r=replica: r.inflight_rows)
        if self.drift:
            metrics.drift_age.labels(name).set_function(lambda: self.drift.age_s)
            metrics.drift_examples.labels(name).set_function(lambda: self.drift.num_examples)
            self._drift_task = asyncio.create_task(self.drift_loop(drift_interval_s), name=f"drift-{name}")

    async def stop(self, timeout_s: float, *, holders_s: float | None = None,
                   stopping: threading.Event | None = None) -> None:
        """Waits for the requests holding this deployment, then drains the batcher: within ``timeout_s`` in all, or,
        with ``holders_s``, up to ``holders_s`` (or until ``stopping`` is set) for the holders and ``timeout_s`` to
        drain."""
        start = time.monotonic()
        deadline = start + (timeout_s if holders_s is None else holders_s)
        while self.holders > 0 and time.monotonic() < deadline and not (stopping is not None and stopping.is_set()):
            await asyncio.sleep(0.005)
        await self.batcher.drain(max(0.0, start + timeout_s - time.monotonic()) if holders_s is None else timeout_s)
        if self._drift_task is not None:
            self._drift_task.cancel()
            await asyncio.gather(self._drift_task, return_exceptions=True)

    def _on_batch(self, metrics: ServerMetrics, name: str):
        batch_size, queue_time = metrics.batch_size.labels(name), metrics.queue_time.labels(name)

        def on_batch(info: BatchInfo) -> None:
            batch_size.observe(info.size)
            for wait in info.queue_times:
                queue_time.observe(wait)
            metrics.replica_batches.labels(name, info.replica).inc()
            metrics.replica_rows.labels(name, info.replica).inc(info.size)
            if self.drift:  # the task's prediction buckets (classes; one bucket for regression, multilabel, dense)
                self.drift.observe(info.inputs, self.model.task.drift_classes(info.outputs)[0])  # binned later
        return on_batch

    @staticmethod
    def _report_drift(metrics: ServerMetrics, name: str):
        def report(kind: str, group: str, value: float) -> None:
            if kind == "input":
                metrics.input_drift.labels(name, group).set(value)
            else:
                metrics.prediction_drift.labels(name).set(value)
        return report

    async def drift_loop(self, interval_s: float) -> None:
        """Folds served batches into the drift window every ``interval_s``, on a worker thread."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.drift.update)
            except Exception:  # monitoring must never take serving down
                log.exception("drift update failed for model %s", self.model.name)


def parse_canary(value: str | None) -> tuple[str, float] | None:
    """``"STAGE:PERCENT"`` -> (stage, share in (0, 1]); a :class:`SwapError` naming the value otherwise."""
    if value is None:
        return None
    stage, _, percent = value.partition(":")
    try:
        share = float(percent) / 100
    except ValueError:
        share = math.nan
    if not stage or not 0 < share <= 1:
        raise SwapError(f"canary {value!r}: expected STAGE:PERCENT with a percentage in (0, 100], e.g. staging:10")
    return stage, share


class Lifecycle:
    """A server's deployments: the stable one per model, optional canary and shadow ones, and the tasks that follow
    registry stages and swap versions."""

    def __init__(self, models: Sequence[ServedModel], config: ServeConfig, metrics: ServerMetrics,
                 devices: Sequence[Any] | None = None):
        self.config, self.metrics, self.devices = config, metrics, devices
        self.deployments = {m.name: Deployment(m, config, metrics, devices) for m in models}  # the stable ones
        self.slots: dict[str, dict[str, Deployment]] = {"stable": self.deployments, "canary": {}, "shadow": {}}
        canary = parse_canary(config.canary)
        self.stages: dict[str, str | None] = {"canary": canary and canary[0], "shadow": config.shadow}
        self._share, self._credit = (canary[1] if canary else 0.0), dict.fromkeys(self.deployments, 0.0)
        for role in ("canary", "shadow"):
            if self.stages[role] is None:
                continue
            for model in models:
                if model.lake_root is None:
                    raise SwapError(f"a {role} needs models from a registry (--lake/--model); {model.name} is not")
                self._load_initial(model, role)
        self._warmed = threading.Event()
        self._stopping = threading.Event()
        self._refused: dict[tuple[str, str], dict[int, float]] = {}
        self._tasks: list[asyncio.Task] = []
        self._preparing: set[asyncio.Future] = set()
        self._retiring: set[asyncio.Task] = set()
        self._mirrors: set[asyncio.Task] = set()
        self._started = False

    def _load_initial(self, stable: ServedModel, role: str) -> None:
        """The canary or shadow version at its stage now (none yet: it is picked up when following)."""
        from lepton_jax.serve.registry import Registry

        version = Registry(stable.lake_root).stages(stable.name).get(self.stages[role])
        if version is None:
            log.info("%s %s@%s: no version at that stage yet", role, stable.name, self.stages[role])
            return
        model = ServedModel.from_registry(stable.lake_root, f"{stable.name}@{version}")
        if why := stable.incompatibility(model):
            raise SwapError(f"{role} {model.name}@{model.version} cannot serve beside version {stable.version}: {why}")
        model.share_compiled(stable)
        self.slots[role][stable.name] = Deployment(model, self.config, self.metrics, self.devices, role)

    def all(self) -> list[Deployment]:
        return [dep for slot in self.slots.values() for dep in slot.values()]

    # -- routing ---------------------------------------------------------------------------------------------
    def pick(self, name: str, version: str | None, *, route: bool = False) -> Deployment:
        """The deployment for a request to ``name`` (and ``version``, from a versioned path), or a 404. With
        ``route`` (an inference request), the canary takes its share of unversioned requests."""
        if name not in self.deployments:
            raise RequestError(404, "unknown_model", f"unknown model {name!r}; this server serves: "
                                                     f"{', '.join(sorted(self.deployments))}")
        dep, canary = self.deployments[name], self.slots["canary"].get(name)
        if version is not None:
            if version == dep.model.version:
                return dep
            if canary is not None and version == canary.model.version:
                return canary
            also = f" and {canary.model.version} (canary)" if canary is not None else ""
            raise RequestError(404, "unknown_model", f"model {name!r} has no version {version!r} on this server; it "
                                                     f"serves version {dep.model.version}{also}")
        if route and canary is not None and canary.model.version != dep.model.version:
            self._credit[name] += self._share  # weighted round robin: exactly PERCENT of requests over time
            if self._credit[name] >= 1.0:
                self._credit[name] -= 1.0
                return canary
        return dep

    async def infer(self, dep: Deployment, rows: np.ndarray, timeout_s: float) -> np.ndarray:
        """Probabilities for ``rows`` from ``dep``'s batcher (counted per version; mirrored to a shadow)."""
        start = time.perf_counter()
        probabilities = await dep.batcher.infer(rows, timeout_s=timeout_s)
        dep.answered.inc()
        dep.inference_time.observe(time.perf_counter() - start)
        shadow = self.slots["shadow"].get(dep.model.name) if dep.role == "stable" else None
        if shadow is not None and shadow.model.version != dep.model.version:
            task = asyncio.ensure_future(self._mirror(shadow, rows, probabilities.argmax(-1), timeout_s))
            self._mirrors.add(task)
            task.add_done_callback(self._mirrors.discard)
        return probabilities

    async def _mirror(self, shadow: Deployment, rows: np.ndarray, answered: np.ndarray, timeout_s: float) -> None:
        labels = (shadow.model.name, shadow.model.version)
        shadow.holders += 1
        try:
            classes = (await shadow.batcher.infer(rows, timeout_s=timeout_s)).argmax(-1)
        except Exception:  # a full queue, a timeout, a retired shadow: the mirror is dropped, never the answer
            self.metrics.shadow_dropped.labels(*labels).inc(rows.shape[0])
            return
        finally:
            shadow.holders -= 1
        self.metrics.shadow_rows.labels(*labels).inc(rows.shape[0])
        self.metrics.shadow_agreed.labels(*labels).inc(int((classes == answered).sum()))

    # -- start-up and shutdown -------------------------------------------------------------------------------
    def warm_up(self, stop: threading.Event | None = None) -> bool:
        """Compiles every bucket on every replica of every deployment (blocking; call from a worker thread); False
        when ``stop`` ended it early."""
        for dep in self.all():
            if not dep.batcher.warm_up(_example(dep.model), stop):
                return False
        self._warmed.set()
        return True

    def start(self) -> None:
        """Starts the batchers, drift tasks and (with ``follow``) one task per followed stage, on the event loop."""
        self._started = True
        for dep in self.all():
            dep.start(self.config.drift_interval_s)
        if not self.config.follow:
            return
        for name, dep in self.deployments.items():
            targets = [(role, self.stages[role]) for role in ("canary", "shadow") if self.stages[role]]
            requested = dep.model.info.get("requested", "")
            if dep.model.info.get("stage") or "@" not in requested:  # a stage, `latest` or a bare name (latest)
                targets.insert(0, ("stable", dep.model.info.get("stage") or "latest"))
            else:
                log.warning("follow: %s was loaded as %s, not from a stage; its version stays", name,
                            dep.model.info.get("requested", f"version {dep.model.version}"))
            for role, stage in targets:
                if dep.model.lake_root is not None:
                    self._tasks.append(asyncio.create_task(self._follow(dep.model, role, stage),
                                                           name=f"follow-{name}-{role}"))

    async def stop(self, timeout_s: float) -> None:
        """Stops following, waits for a version still loading, then drains every deployment."""
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*self._preparing, return_exceptions=True)  # a compile on a thread ends first
        stops = [asyncio.ensure_future(dep.stop(timeout_s)) for dep in self.all()]  # beside the retiring ones
        await asyncio.gather(*self._mirrors, *self._retiring, return_exceptions=True)
        await asyncio.gather(*stops)

    def abandon(self, reason: str) -> None:
        """A force quit: every deployment's queued and running requests fail now (see the batcher's abandon)."""
        self._stopping.set()
        for dep in self.all():
            dep.batcher.abandon(reason)

    # -- following a stage -----------------------------------------------------------------------------------
    async def _follow(self, served: ServedModel, role: str, stage: str) -> None:
        """Polls ``stage`` of ``served``'s model every ``follow_interval_s`` and swaps ``role`` to its version."""
        from lepton_jax.serve.registry import Registry

        name, failing = served.name, False
        while not self._warmed.is_set():  # the start-up warm-up first
            await asyncio.sleep(0.05)
        registry = await asyncio.to_thread(Registry, served.lake_root)
        log.info("following %s@%s (%s) every %.3g s", name, stage, role, self.config.follow_interval_s)

        def look_up() -> int | None:  # on a worker thread: the registry may be an object store
            return registry.versions(name)[-1] if stage == "latest" else registry.stages(name).get(stage)

        while True:
            try:
                version = await asyncio.to_thread(look_up)
            except Exception as e:  # keep serving what we have; say so once per outage
                if not failing:
                    log.warning("following %s@%s: cannot read the registry (%s: %s); still serving what it serves",
                                name, stage, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                failing = True
            else:
                if failing:
                    log.info("following %s@%s: the registry answers again", name, stage)
                failing = False
                if version is not None and self._wanted(name, role, int(version)):
                    try:
                        await self._swap(served, role, stage, int(version))
                    except Exception:  # a bug, not a bad version (those are refused in _swap): keep serving
                        log.exception("follow %s@%s: swapping to version %s failed", name, stage, version)
            await asyncio.sleep(self.config.follow_interval_s)

    def _wanted(self, name: str, role: str, version: int) -> bool:
        current = self.slots[role].get(name)
        if current is not None and current.model.version == str(version):
            return False
        return self._refused.get((name, role), {}).get(version, -math.inf) <= time.monotonic()

    async def _swap(self, served: ServedModel, role: str, stage: str, version: int) -> None:
        """Loads and warms ``version`` on a worker thread, then makes it ``role``'s deployment of the model."""
        name, start = served.name, time.perf_counter()
        current = self.slots[role].get(name)
        reference = self.deployments[name].model  # clients were promised its input spec and labels
        loading = asyncio.ensure_future(asyncio.to_thread(self._prepare, reference, role, stage, version, current))
        self._preparing.add(loading)
        loading.add_done_callback(self._preparing.discard)
        try:
            dep = await asyncio.shield(loading)
        except Exception as e:
            permanent = isinstance(e, LeptonError)
            self._refused.setdefault((name, role), {})[version] = \
                math.inf if permanent else time.monotonic() + RETRY_AFTER_S
            self.metrics.swaps_failed.labels(name, role).inc()
            log.warning("follow %s@%s: refused version %d (%s: %s); still serving %s%s", name, stage, version,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "",
                        f"version {current.model.version}" if current is not None else "nothing in this role",
                        "" if permanent else f"; will try it again in {RETRY_AFTER_S:g} s")
            return
        if dep is None or self._stopping.is_set():  # the server began to shut down meanwhile
            return
        dep.start(self.config.drift_interval_s)
        self.slots[role][name] = dep  # from here new requests take it; those holding the old one finish there
        self.metrics.swaps.labels(name, role).inc()
        log.info("follow %s@%s: now serving version %d (%s; was %s), loaded and warmed in %.2f s", name, stage,
                 version, role, current.model.version if current is not None else "none",
                 time.perf_counter() - start)
        if current is not None:
            retiring = asyncio.ensure_future(current.stop(self.config.drain_timeout_s, holders_s=RETIRE_WAIT_S,
                                                          stopping=self._stopping))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)

    def _prepare(self, reference: ServedModel, role: str, stage: str, version: int,
                 current: Deployment | None) -> Deployment | None:
        """On a worker thread: load (digests checked), check, build replicas and compile every bucket."""
        model = ServedModel.from_registry(reference.lake_root, f"{reference.name}@{version}")
        if why := reference.incompatibility(model):
            raise SwapError(f"{model.name}@{model.version} cannot replace version {reference.version}: {why}")
        model.info.update({"requested": f"{reference.name}@{stage}", "stage": stage})
        model.share_compiled(current.model if current is not None else reference)
        dep = Deployment(model, self.config, self.metrics, self.devices, role)
        if not dep.batcher.warm_up(_example(model), self._stopping):
            return None
        return dep


def _example(model: ServedModel) -> np.ndarray:
    return np.full(model.example_shape, model.value_range[0], np.float32)


def _version_number(version: str) -> float:
    return float(version) if version.isdigit() else math.nan
