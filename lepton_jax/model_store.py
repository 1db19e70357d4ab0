"""Registered models as a lake stores them, read side: a version's record (resolved from ``name@version`` or
``name@stage``) and its parameter tree, with digests checked. The registry (:mod:`lepton_jax.serve.registry`) writes
and manages them; training's init path (:mod:`lepton_jax.train.init`, fine-tuning) reads them through this module,
which sits below ``train`` so no upward import is needed (``serve/lake_params.py`` re-exports the tree functions).

A parameter tree stored in the lake: one zarr v3 array per leaf, written and read only through the lake's
storage interface (:meth:`lepton_jax.lake.storage.Storage.kvstore`), so it lives wherever the lake does.

Under a key prefix ``KEY`` a tree of ``n`` leaves is stored as ``KEY/0000/ ... KEY/<n-1>/`` (each a zarr v3 array,
one zstd-compressed, crc32c-checksummed chunk). What identifies it is its *manifest*, kept by the caller (the
registry record): each leaf's tree path, shape and dtype, and a sha256 over the tree structure and every leaf's bytes
(:func:`tree_digest`). :func:`read_tree` checks the structure against the model being restored and the digest
against the bytes it read; a mismatch is one :class:`ParamsError` line. TensorStore's file driver fsyncs each file
and directory it writes (``file_io_sync``, set explicitly), so once :func:`write_tree` returns, the arrays are durable.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from lepton_jax.errors import LeptonError
from lepton_jax.lake.arrays import tensorstore_guard

FORMAT = "zarr3-leaves/1"
_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}},
           {"name": "zstd", "configuration": {"level": 3, "checksum": False}},
           {"name": "crc32c"}]
MODELS_DIR, STAGES_DIR = "_models", "_stages"  # the registry's layout (lepton_jax.serve.registry writes it)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ParamsError(LeptonError):
    """Stored parameters are missing, corrupt, or do not fit the model they are restored into."""


def tree_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs in the tree's flattening order (paths as :func:`jax.tree_util.keystr` writes them)."""
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def tree_digest(leaves: list[tuple[str, np.ndarray]]) -> str:
    """sha256 over the structure (each leaf's path, dtype and shape, in order) and then every leaf's bytes."""
    h = hashlib.sha256()
    h.update(json.dumps([[p, np.dtype(a.dtype).str, list(a.shape)] for p, a in leaves]).encode())
    for _, a in leaves:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _spec(storage: Any, key: str, shape: tuple[int, ...] | None = None, dtype: Any = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": storage.kvstore(key)}
    if shape is not None:
        spec["metadata"] = {"shape": list(shape), "data_type": np.dtype(dtype).name,
                            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, d)
                                                                                                for d in shape]}},
                            "codecs": _CODECS}
    return spec


def write_tree(storage: Any, key: str, tree: Any) -> dict[str, Any]:
    """Writes every leaf of ``tree`` (fully addressable arrays) under ``key``; returns the manifest to keep."""
    leaves = [(p, np.asarray(jax.device_get(a))) for p, a in tree_leaves(tree)]
    tensorstore_guard()
    context = ts.Context({"file_io_sync": True})  # local disk: fsync files and directories (other drivers ignore it)
    futures = []
    for i, (_, a) in enumerate(leaves):
        store = ts.open(_spec(storage, f"{key}/{i:04d}", a.shape, a.dtype), create=True, context=context).result()
        futures.append(store.write(a))
    for f in futures:
        f.result()
    return {"format": FORMAT, "key": key, "sha256": tree_digest(leaves),
            "bytes": int(sum(a.nbytes for _, a in leaves)),
            "leaves": [{"path": p, "shape": list(a.shape), "dtype": np.dtype(a.dtype).name} for p, a in leaves]}


def read_tree(storage: Any, manifest: dict[str, Any], abstract: Any, *, what: str) -> Any:
    """The tree ``manifest`` describes, as ``abstract`` (a tree of ShapeDtypeStructs with shardings) lays it out.

    ``what`` names the parameters in errors (e.g. ``model digits@3``)."""
    if manifest.get("format") != FORMAT:
        raise ParamsError(f"{what}: stored parameters have format {manifest.get('format')!r}, expected {FORMAT!r}")
    expected = tree_leaves(abstract)
    stored = manifest["leaves"]
    want = [(p, list(a.shape), np.dtype(a.dtype).name) for p, a in expected]
    have = [(m["path"], list(m["shape"]), m["dtype"]) for m in stored]
    if want != have:
        diff = next((f"{h} vs the model's {w}" for h, w in zip(have, want, strict=False) if h != w),
                    f"{len(have)} leaves vs the model's {len(want)}")
        raise ParamsError(f"{what}: stored parameters do not fit the model its config builds ({diff})")
    arrays = [a for _, a in read_leaves(storage, manifest, what=what)]
    placed = [jax.device_put(a, leaf.sharding) if getattr(leaf, "sharding", None) is not None else a
              for a, (_, leaf) in zip(arrays, expected, strict=True)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), placed)


def read_leaves(storage: Any, manifest: dict[str, Any], *, what: str) -> list[tuple[str, np.ndarray]]:
    """Every stored leaf ``(path, array)`` in the manifest's order, checked against the manifest's sha256 (a
    :class:`ParamsError` line when an array is missing, unreadable or altered)."""
    if manifest.get("format") != FORMAT:
        raise ParamsError(f"{what}: stored parameters have format {manifest.get('format')!r}, expected {FORMAT!r}")
    key, stored = manifest["key"], manifest["leaves"]
    tensorstore_guard()
    try:
        stores = [ts.open(_spec(storage, f"{key}/{i:04d}"), open=True).result() for i in range(len(stored))]
        arrays = [f.result() for f in [s.read() for s in stores]]
    except ValueError as e:
        raise ParamsError(f"{what}: stored parameters under {key} are missing or unreadable "
                          f"({str(e).splitlines()[0].split(' [tensorstore_spec')[0]})") from e
    leaves = [(m["path"], np.asarray(a)) for m, a in zip(stored, arrays, strict=True)]
    if tree_digest(leaves) != manifest["sha256"]:
        raise ParamsError(f"{what}: stored parameters under {key} do not match the sha256 in its record (corrupt "
                          "or altered); re-register the model")
    return leaves


def delete_tree(storage: Any, key: str) -> None:
    """Removes every object under ``key`` (through the storage's kvstore)."""
    tensorstore_guard()
    ts.KvStore.open(storage.kvstore(key)).result().delete_range(ts.KvStore.KeyRange()).result()


def resolve_record(storage: Any, ref: str) -> dict[str, Any]:
    """The published record of registry reference ``ref`` (``name``, ``name@<version>``, ``name@latest`` or
    ``name@<stage>``) in the lake ``storage`` opens, read-only; a :class:`ParamsError` line when the name, version or
    stage is unknown. Layout as :mod:`lepton_jax.serve.registry` writes it: ``_models/<name>/<version:08d>.json``
    and ``_models/<name>/_stages/<stage>/<sequence:08d>.json`` (the highest sequence is the stage's holder)."""
    name, _, tag = ref.partition("@")
    where = f"registry {str(storage.uri).rstrip('/')}/{MODELS_DIR}"
    if not _NAME.match(name) or (tag and not _NAME.match(tag)):
        raise ParamsError(f"invalid model reference {ref!r}: use NAME, NAME@VERSION or NAME@STAGE")
    versions = _numbered(storage, f"{MODELS_DIR}/{name}")
    if not versions:
        raise ParamsError(f"{where} has no model {name!r}; register one with `lepton-jax registry register`")
    if not tag or tag == "latest":
        version = versions[-1]
    elif tag.isdigit():
        version = int(tag)
    else:
        stages = sorted(storage.list(f"{MODELS_DIR}/{name}/{STAGES_DIR}/"))
        entries = _numbered(storage, f"{MODELS_DIR}/{name}/{STAGES_DIR}/{tag}") if tag in stages else []
        if not entries:
            raise ParamsError(f"model {name!r} in {where} has no version at stage {tag!r}; stages: "
                              f"{', '.join(stages) or 'none'}; promote one with `lepton-jax registry promote`")
        version = int(_read_json(storage, f"{MODELS_DIR}/{name}/{STAGES_DIR}/{tag}/{entries[-1]:08d}.json")["version"])
    if version not in versions:
        raise ParamsError(f"model {name!r} in {where} has no version {version}; versions: {versions}")
    record = _read_json(storage, f"{MODELS_DIR}/{name}/{version:08d}.json")
    if not isinstance(record, dict) or record.get("version") != version:
        raise ParamsError(f"{where}: the record of {name}@{version} is not a model record; re-register the model")
    return record



def _numbered(storage: Any, prefix: str) -> list[int]:
    return sorted(int(n[:-5]) for n in storage.list(f"{prefix}/") if n.endswith(".json") and n[:-5].isdigit())


def _read_json(storage: Any, key: str) -> Any:
    try:
        return json.loads(storage.read(key))
    except (OSError, ValueError) as e:
        raise ParamsError(f"registry record {storage.uri}/{key} is unreadable ({e})") from e
