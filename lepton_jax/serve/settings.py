"""A server's settings (:class:`ServeConfig`): read by the HTTP app (:mod:`lepton_jax.serve.server`) and the model
lifecycle (:mod:`lepton_jax.serve.lifecycle`) alike."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ServeConfig:
    """Batching, back-pressure, limits, lifecycle and monitoring of a :class:`ModelServer`.

    ``max_body_bytes=None`` derives the body limit from the largest legal request: ``max_request_rows`` rows
    written as JSON at :data:`~lepton_jax.serve.lifecycle.JSON_BYTES_PER_VALUE` bytes per value, plus 64 KiB. A
    request with more rows than ``min(max_request_rows, max_queue_rows)`` can never be queued and gets 413.

    Bodies over ``inline_parse_bytes`` are decoded (and their answers encoded) in ``codec_processes`` worker
    processes, so neither the event loop nor the GIL is held while megabytes of JSON are parsed; 0 uses threads.
    The workers run ``codec_niceness`` steps below the server's CPU priority (``os.nice``), so where they share a core
    with the event loop, decoding one huge body yields the core to the small requests behind it (head-of-line). The
    default, 19 (the lowest priority), is for latency: on one shared core it gave a lower small-request p99 beside
    inflating gzip bodies than 10 did (1.52x and 1.65x the unloaded p99 vs 1.89x and 1.86x in two pairs of runs of
    ``scripts/bench_serve_peers.py --repeats 1 --gzip-repeats 7``), at 10-15% fewer large bodies served meanwhile.

    ``follow``: models loaded from a registry stage follow it, polled every ``follow_interval_s``; ``canary``
    ("STAGE:PERCENT") and ``shadow`` ("STAGE") add a version that answers a share of requests, or only mirrors them
    (see :mod:`lepton_jax.serve.lifecycle`).

    Slow clients (:mod:`~lepton_jax.serve.http_limits`): a body must arrive within ``body_timeout_s`` (408), a
    connection with no request in progress closes after ``idle_timeout_s``, connections beyond ``max_connections``
    get 503. Shutdown takes at most ``drain_grace_s`` + ``drain_timeout_s`` (20 s by default: inside Kubernetes' 30 s);
    what is still running then answers 503.
    """

    max_batch_size: int = 32
    max_delay_ms: float = 2.0
    max_queue_rows: int = 1024
    request_timeout_s: float = 10.0
    max_body_bytes: int | None = None
    max_request_rows: int = 1024
    replicas: int = 1
    token: str | None = None
    drain_grace_s: float = 5.0
    drain_timeout_s: float = 15.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 5.0
    max_connections: int = 1000
    follow: bool = False
    follow_interval_s: float = 2.0
    canary: str | None = None
    shadow: str | None = None
    drift_window: int = 1000
    drift_window_s: float | None = None
    drift_min_samples: int = 200
    drift_threshold: float = 0.25
    drift_interval_s: float = 1.0
    inline_parse_bytes: int = 64 << 10
    codec_processes: int = 1
    codec_niceness: int = 19
    warm_up_on_startup: bool = True
