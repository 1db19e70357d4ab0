"""The incremental drift window gives the same PSI as recomputing it over the window's examples."""

import time

import numpy as np
import pytest

from lepton_jax.serve.drift import DriftMonitor, drift_report, reference_stats


@pytest.fixture
def reference():
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 16, (500, 8, 8))
    return reference_stats(raw, rng.integers(0, 10, 500), num_classes=10, value_range=(0, 16))


def test_incremental_window_matches_a_full_recompute(reference):
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(reference, window=100, min_samples=10)
    raws, preds = [], []
    for size in (7, 30, 1, 64, 13, 90, 45):  # 250 examples: the window slides over chunk boundaries
        raw = rng.uniform(0, 16, (size, 8, 8)) * rng.uniform(0.3, 1.0)  # shifted differently per batch
        pred = rng.integers(0, 10, size)
        monitor.observe(raw, pred)
        raws.append(raw)
        preds.append(pred)
        if monitor.update() is None:
            assert sum(map(len, raws)) < 10
            continue
        full = drift_report(reference, np.concatenate(raws)[-100:], np.concatenate(preds)[-100:])
        assert monitor.latest["num_examples"] == min(100, sum(map(len, raws)))
        np.testing.assert_allclose(list(monitor.latest["groups"].values()), list(full["groups"].values()))
        assert monitor.latest["predictions"] == pytest.approx(full["predictions"])
    assert monitor.age_s < 1


def test_time_window_evicts_old_examples_and_observe_only_queues(reference):
    monitor = DriftMonitor(reference, window=1000, window_s=0.05, min_samples=1, max_pending=2)
    rng = np.random.default_rng(2)
    for _ in range(3):  # the oldest queued batch is dropped, and counted
        monitor.observe(rng.uniform(0, 16, (5, 8, 8)), rng.integers(0, 10, 5))
    assert monitor.latest == {} and monitor.dropped == 5 and monitor.observed == 15
    monitor.update()
    assert monitor.num_examples == 10
    time.sleep(0.1)
    monitor.observe(rng.uniform(0, 16, (3, 8, 8)), rng.integers(0, 10, 3))
    monitor.update()
    assert monitor.num_examples == 3
