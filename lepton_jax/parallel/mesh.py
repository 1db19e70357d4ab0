"""Meshes from config: named axes whose sizes multiply to the device count; a size of -1 fills the rest.

Batches are split along every data-like axis (``data`` and ``fsdp``); parameters are replicated unless sharding
rules say otherwise.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lepton_jax.errors import ConfigError

DATA_AXES = ("data", "fsdp")


def make_mesh(config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all; ``config.num_devices`` > 0 takes the first N) with ``config.axes``."""
    devices = list(jax.devices() if devices is None else devices)
    num = int(config.get("num_devices", -1))
    if num > 0:
        if num > len(devices):
            raise ConfigError(f"mesh.num_devices={num} but only {len(devices)} devices are present")
        devices = devices[:num]
    axes = dict(config.axes)
    sizes = list(axes.values())
    fill = [name for name, size in axes.items() if size == -1]
    if len(fill) > 1:
        raise ConfigError(f"mesh.axes {axes}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh.axes {axes}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if len(devices) % known:
            raise ConfigError(f"mesh.axes {axes} (product {known}) does not divide the {len(devices)} devices")
        axes[fill[0]] = len(devices) // known
    if math.prod(axes.values()) != len(devices):
        raise ConfigError(f"mesh.axes {axes} needs {math.prod(axes.values())} devices, "
                          f"but {len(devices)} are present; set one axis to -1 or mesh.num_devices")
    return Mesh(np.asarray(devices).reshape(tuple(axes.values())), tuple(axes))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in mesh.axis_names if a in DATA_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over the mesh's data axes, the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))
