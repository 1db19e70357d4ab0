"""A synthetic accelerometer log, for trying the CSV sensor path without data of your own.

Clearly synthetic (no real sensor recorded it): three activities with their own rhythm and intensity — ``idle``
(sensor noise around gravity), ``walk`` (about 2 Hz, moderate), ``run`` (about 3 Hz, strong, with a harmonic) —
sampled at 50 Hz on three axes, in sessions that each cycle through the activities in a random order. Per-session
frequency, amplitude, phase and sensor offsets vary, so a model must learn the rhythm rather than a constant.

    .venv/bin/python -m lepton_jax.lake.synthetic data/activity.csv [--sessions 12] [--seconds 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from lepton_jax.files import atomic_write

ACTIVITIES = {"idle": (0.0, 0.05), "walk": (2.0, 0.6), "run": (3.0, 1.4)}  # (base frequency Hz, amplitude g)
RATE_HZ = 50


def activity_log(*, sessions: int = 12, seconds_per_activity: float = 20.0, seed: int = 0) -> list[dict]:
    """Rows ``{time, session, label, ax, ay, az}``; every session holds each activity once, in random order."""
    rng = np.random.default_rng(seed)
    n = int(seconds_per_activity * RATE_HZ)
    rows = []
    for s in range(sessions):
        offset = rng.normal(0.0, 0.05, size=3) + np.array([0.0, 0.0, 1.0])  # mounting angle; gravity on z
        t0 = 0.0
        for label in rng.permutation(list(ACTIVITIES)):
            freq, amp = ACTIVITIES[label]
            freq *= rng.uniform(0.85, 1.15)
            amp *= rng.uniform(0.8, 1.2)
            t = t0 + np.arange(n) / RATE_HZ
            phase = rng.uniform(0, 2 * np.pi, size=3)
            axes = np.stack([amp * w * np.sin(2 * np.pi * freq * t + p) for w, p in zip((1.0, 0.5, 0.8), phase,
                                                                                       strict=True)], axis=1)
            if label == "run":
                axes += 0.3 * amp * np.sin(4 * np.pi * freq * t)[:, None]
            axes += offset + rng.normal(0.0, 0.05, size=(n, 3))
            rows += [{"time": f"{ti:.2f}", "session": f"s{s:02d}", "label": str(label),
                      "ax": f"{a:.4f}", "ay": f"{b:.4f}", "az": f"{c:.4f}"} for ti, (a, b, c) in zip(t, axes,
                                                                                                      strict=True)]
            t0 = float(t[-1]) + 1.0 / RATE_HZ
    return rows


def write_activity_csv(path: str | Path, **kwargs) -> Path:
    """Writes :func:`activity_log` to ``path`` atomically (a temp file renamed into place)."""
    path = Path(path)
    rows = activity_log(**kwargs)
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--sessions", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of each activity per session")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_activity_csv(args.path, sessions=args.sessions, seconds_per_activity=args.seconds, seed=args.seed)
    print(f"wrote {path} ({args.sessions} sessions x {len(ACTIVITIES)} activities x {args.seconds:g} s at "
          f"{RATE_HZ} Hz, synthetic)")


if __name__ == "__main__":
    main()
