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
MESH_AXES = ("data", "fsdp", "tensor", "nodes")  # every axis name the library gives a meaning to


def mesh_config(axes: dict[str, int], num_devices: int = -1, dcn_axes: dict[str, int] | None = None
                ) -> ml_collections.ConfigDict:
    """A complete ``mesh`` config section (what :func:`make_mesh` reads)."""
    return ml_collections.ConfigDict({"axes": dict(axes), "num_devices": num_devices, "dcn_axes": dict(dcn_axes or {})})


def make_mesh(config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all; ``config.num_devices`` > 0 takes the first N) with ``config.axes``.

    With ``config.dcn_axes`` (multi-host), ``config.axes`` gives the sizes within one process and ``dcn_axes``
    the sizes across processes.
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = sorted(set(dict(config.axes)) - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh.axes names {unknown}; axis names are {', '.join(MESH_AXES)}")
    num = int(config.num_devices)
    if num > 0:
        if num > len(devices):
            raise ConfigError(f"mesh.num_devices={num} but only {len(devices)} devices are present; "
                              + more_devices_hint(num))
        devices = devices[:num]
    axes = dict(config.axes)
    dcn = dict(config.dcn_axes or {})
    processes = len({d.process_index for d in devices})
    per_mesh = len(devices) // processes if dcn else len(devices)  # mesh.axes cover one host when dcn is set
    sizes = list(axes.values())
    fill = [name for name, size in axes.items() if size == -1]
    if len(fill) > 1:
        raise ConfigError(f"mesh.axes {axes}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh.axes {axes}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if per_mesh % known:
            raise ConfigError(f"mesh.axes {axes} (product {known}) does not divide the {per_mesh} devices")
        axes[fill[0]] = per_mesh // known
    if math.prod(axes.values()) != per_mesh:
        needed = math.prod(axes.values())
        raise ConfigError(f"mesh.axes {axes} needs {needed} devices, but {per_mesh} are present; set one axis to -1 "
                          "or mesh.num_devices" + (f", or {more_devices_hint(needed)}" if needed > per_mesh else ""))
    if dcn:
        return _hybrid_mesh(devices, axes, dcn)
    return Mesh(np.asarray(devices).reshape(tuple(axes.values())), tuple(axes))


def more_devices_hint(needed: int) -> str:
    """How to get ``needed`` devices on a development machine (the end of a device-count error)."""
    return (f"on CPU, simulate them with XLA_FLAGS=--xla_force_host_platform_device_count={needed} in the "
            "environment (set before Python starts), or run several processes with `lepton-jax launch`")


def _hybrid_mesh(devices: list, ici: dict[str, int], dcn: dict[str, int]) -> Mesh:
    """``ici`` sizes within a process (host), ``dcn`` sizes across processes; an axis spans ``dcn * ici`` devices,
    with the slow cross-host factor outermost so neighbouring devices on an axis share a host."""
    unknown = set(dcn) - set(ici)
    if unknown:
        raise ConfigError(f"mesh.dcn_axes names {sorted(unknown)}, which mesh.axes does not have")
    names = tuple(ici)
    dcn_sizes = [int(dcn.get(a, 1)) for a in names]
    processes = sorted({d.process_index for d in devices})
    if math.prod(dcn_sizes) != len(processes):
        raise ConfigError(f"mesh.dcn_axes {dcn} needs {math.prod(dcn_sizes)} processes, but the job has "
                          f"{len(processes)}")
    local = len(devices) // len(processes)
    ici_total = math.prod(ici.values())
    if ici_total != local:
        raise ConfigError(f"mesh.axes {ici} (within a host) needs {ici_total} devices per process, "
                          f"but each process has {local}")
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = np.asarray(ordered).reshape(*dcn_sizes, *ici.values())
    k = len(names)
    grid = grid.transpose([i for pair in zip(range(k), range(k, 2 * k), strict=True) for i in pair])
    return Mesh(grid.reshape([dcn_sizes[i] * list(ici.values())[i] for i in range(k)]), names)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in mesh.axis_names if a in DATA_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over the mesh's data axes, the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))
