"""Zarr v3 arrays on TensorStore with the ``sharding_indexed`` codec.

Each array's first axis indexes examples. Inner chunks hold one example, so a random read is one byte range of a
shard; shards group many examples into one file. Chunks are zstd-compressed and both chunks and the shard index carry
crc32c checksums, so flipped bytes are detected on read. Any zarr v3 reader can open the arrays.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import tensorstore as ts

from lepton_jax.errors import LakeError

TARGET_SHARD_BYTES = 64 * 2**20


def zarr3_spec(path: str | Path, shape: tuple[int, ...], dtype: np.dtype,
               target_shard_bytes: int = TARGET_SHARD_BYTES) -> dict:
    """The TensorStore spec for a new sharded, compressed, checksummed zarr v3 array at a local path."""
    example_shape = list(shape[1:])
    example_bytes = max(1, int(np.prod(example_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    per_shard = int(max(1, min(shape[0], target_shard_bytes // example_bytes)))
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": list(shape),
            "data_type": np.dtype(dtype).name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [per_shard, *example_shape]}},
            "codecs": [{
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [1, *example_shape],
                    "codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "zstd", "configuration": {"level": 3}},
                        {"name": "crc32c"},
                    ],
                    "index_codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "crc32c"},
                    ],
                    "index_location": "end",
                },
            }],
        },
    }


def content_digest(array: np.ndarray) -> str:
    """sha256 over dtype, shape and the C-order bytes: equal digests mean equal arrays."""
    h = hashlib.sha256(f"{np.dtype(array.dtype).str}{tuple(array.shape)}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def write_array(path: Path, array: np.ndarray) -> str:
    """Writes a new array (the path must not exist) and returns its content digest."""
    if array.ndim == 0 or array.shape[0] == 0:
        raise LakeError(f"cannot store an empty array at {path}: shape {array.shape}")
    if path.exists():
        raise LakeError(f"refusing to overwrite existing array {path}; lake arrays are written once")
    store = ts.open(zarr3_spec(path, array.shape, array.dtype), create=True).result()
    store.write(array).result()
    return content_digest(array)


def open_array(path: Path) -> ts.TensorStore:
    """Opens an existing array for reading, turning TensorStore errors into a LakeError naming the path."""
    try:
        return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}},
                       open=True, read=True).result()
    except ValueError as e:
        raise LakeError(f"cannot open lake array {path}: {e}; run `lepton-jax lake verify` or re-ingest") from e


def read(store: ts.TensorStore, index=slice(None), *, path: Path | str = "") -> np.ndarray:
    """Reads ``store[index]`` into numpy; corrupt or missing chunks raise a LakeError naming the array."""
    try:
        return store[index].read().result()
    except ValueError as e:
        raise LakeError(f"corrupt lake array {path or store.kvstore}: {e}") from e
