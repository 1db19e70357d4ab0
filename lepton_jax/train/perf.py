"""Model FLOPs and utilisation: XLA's cost analysis of a compiled step and peak FLOP/s per device kind."""

from __future__ import annotations

from typing import Any

import jax

# Dense bf16 peak FLOP/s per device (vendor figures). MFU is reported only for kinds listed here.
PEAK_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12}


def compiled_flops(jitted, *args: Any) -> float | None:
    """FLOPs of one call of ``jitted(*args)`` per XLA's cost analysis (None where the backend gives none)."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def peak_flops(device: jax.Device | None = None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def mfu(flops_per_step: float | None, steps_per_second: float) -> float | None:
    """Model FLOPs utilisation over all devices, or None when the FLOPs or the device peak are unknown."""
    peak = peak_flops()
    if not flops_per_step or not peak:
        return None
    return flops_per_step * steps_per_second / (peak * jax.device_count())
