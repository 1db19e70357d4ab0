"""Prometheus metrics of a model server, in a registry of its own (several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """Request, queue, batch, replica, error and drift metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lepton_requests", "Inference requests by model and HTTP status code",
                                ["model", "code"], registry=r)
        self.latency = Histogram("lepton_request_latency_seconds", "Inference request latency, body read to reply",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("lepton_queue_time_seconds", "Time a request waited in the batcher's queue",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("lepton_batch_size", "Rows per executed batch (before padding)", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("lepton_queue_depth_rows", "Rows waiting in the batcher's queue", ["model"],
                                 registry=r)
        self.errors = Counter("lepton_errors", "Failed requests by kind", ["kind"], registry=r)
        self.replica_batches = Counter("lepton_replica_batches", "Batches executed per replica",
                                       ["model", "replica"], registry=r)
        self.replica_rows = Counter("lepton_replica_rows", "Rows executed per replica", ["model", "replica"],
                                    registry=r)
        self.replica_inflight = Gauge("lepton_replica_inflight_rows", "Rows running on each replica now",
                                      ["model", "replica"], registry=r)
        self.input_drift = Gauge("lepton_input_drift_psi", "PSI of live inputs vs. training data, per feature group",
                                 ["model", "group"], registry=r)
        self.prediction_drift = Gauge("lepton_prediction_drift_psi",
                                      "PSI of live predicted classes vs. predictions on the training data", ["model"],
                                      registry=r)
        self.drift_age = Gauge("lepton_drift_age_seconds", "Seconds since the drift PSI gauges were recomputed "
                               "(a background task; +Inf before the window has its minimum of examples)", ["model"],
                               registry=r)
        self.drift_examples = Gauge("lepton_drift_window_examples", "Served examples in the drift window now",
                                    ["model"], registry=r)
        self.ready = Gauge("lepton_ready", "1 when warm-up is done and the server takes requests", registry=r)
        # the model lifecycle (serve.lifecycle): versions served, swaps, canary and shadow
        self.model_version = Gauge("lepton_model_version", "Registry version each model serves, by role (stable; "
                                   "canary and shadow when configured)", ["model", "role"], registry=r)
        self.swaps = Counter("lepton_model_swaps", "Versions swapped in by following a registry stage",
                             ["model", "role"], registry=r)
        self.swaps_failed = Counter("lepton_model_swaps_failed", "Versions a following server refused (failed to "
                                    "load, or a changed input spec or label set); the old version kept serving",
                                    ["model", "role"], registry=r)
        self.version_requests = Counter("lepton_version_requests", "Inference requests answered, per model version",
                                        ["model", "version"], registry=r)
        self.version_inference = Histogram("lepton_version_inference_seconds", "Time from a request's rows entering "
                                           "the batcher to its answer, per model version", ["model", "version"],
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.shadow_rows = Counter("lepton_shadow_rows", "Rows mirrored to the shadow version and answered by it",
                                   ["model", "version"], registry=r)
        self.shadow_agreed = Counter("lepton_shadow_agreed_rows", "Mirrored rows whose top-1 class from the shadow "
                                     "version equals the answered one", ["model", "version"], registry=r)
        self.shadow_dropped = Counter("lepton_shadow_dropped_rows", "Rows not mirrored (the shadow's queue was full "
                                      "or it timed out); answers are never affected", ["model", "version"],
                                      registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
