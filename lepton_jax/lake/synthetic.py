"""A synthetic accelerometer log, for trying the CSV sensor path without data of your own.

Clearly synthetic (no real sensor recorded it): three activities with their own rhythm and intensity — ``idle``
(sensor noise around gravity), ``walk`` (about 2 Hz, moderate), ``run`` (about 3 Hz, strong, with a harmonic) —
sampled at 50 Hz on three axes, in sessions that each cycle through the activities in a random order. Per-session
frequency, amplitude, phase and sensor offsets vary, so a model must learn the rhythm rather than a constant.

With ``--speed`` the log gains a continuous column ``speed`` (m/s, a regression target): cadence times stride
length, where the cadence is the activity's step frequency and the stride grows with the swing amplitude
(``STRIDE_M`` at the activity's base amplitude), plus a little reading noise (sd 0.05 m/s) while moving; 0 when idle.
Walking lands near 1.4 m/s and running near 3 m/s, and within an activity the speed follows the session's rhythm and
intensity, so it is learnable from the accelerometer alone. The other columns are the same as without ``--speed``.

    .venv/bin/python -m lepton_jax.lake.synthetic data/activity.csv [--sessions 12] [--seconds 20] [--seed 0] \
        [--speed]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from lepton_jax.files import atomic_write

ACTIVITIES = {"idle": (0.0, 0.05), "walk": (2.0, 0.6), "run": (3.0, 1.4)}  # (base frequency Hz, amplitude g)
RATE_HZ = 50
STRIDE_M = {"idle": 0.0, "walk": 0.7, "run": 1.0}  # metres per step at the activity's base amplitude
SPEED_NOISE = 0.05  # m/s, the speed reading's noise while moving


def activity_log(*, sessions: int = 12, seconds_per_activity: float = 20.0, seed: int = 0,
                 speed: bool = False) -> list[dict]:
    """Rows ``{time, session, label, ax, ay, az}`` (plus ``speed`` in m/s with ``speed=True``); every session holds
    each activity once, in random order. The speed's noise comes from its own generator, so the other columns do
    not depend on ``speed``."""
    rng = np.random.default_rng(seed)
    speed_rng = np.random.default_rng([seed, 1])
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
            segment = [{"time": f"{ti:.2f}", "session": f"s{s:02d}", "label": str(label),
                        "ax": f"{a:.4f}", "ay": f"{b:.4f}", "az": f"{c:.4f}"} for ti, (a, b, c) in zip(t, axes,
                                                                                                        strict=True)]
            if speed:
                base_freq, base_amp = ACTIVITIES[label]
                metres = STRIDE_M[label] * (amp / base_amp if base_amp else 0.0)
                values = freq * metres + (speed_rng.normal(0.0, SPEED_NOISE, size=n) if metres else np.zeros(n))
                for row, v in zip(segment, np.maximum(values, 0.0), strict=True):
                    row["speed"] = f"{v:.3f}"
            rows += segment
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
    parser.add_argument("--speed", action="store_true", help="add a continuous 'speed' column (m/s): a regression "
                                                             "target")
    args = parser.parse_args(argv)
    path = write_activity_csv(args.path, sessions=args.sessions, seconds_per_activity=args.seconds, seed=args.seed,
                              speed=args.speed)
    print(f"wrote {path} ({args.sessions} sessions x {len(ACTIVITIES)} activities x {args.seconds:g} s at "
          f"{RATE_HZ} Hz, synthetic{', with speed in m/s' if args.speed else ''})")


if __name__ == "__main__":
    main()
