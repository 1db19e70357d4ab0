"""Where a lake's keys live: one interface for the lake's small metadata objects (records, markers).

A key is a ``/``-separated path relative to the lake root (``<table>/_log/00000001.json``). The lake needs four
primitives from a backend: read a key, list keys under a prefix, delete a key, and an atomic **create-if-absent**
(the commit point). :class:`LocalStorage` implements them on a directory (``os.link`` from an fsynced temp file, or
``O_CREAT|O_EXCL`` where there are no hard links). Object-store backends (``s3://``, ``gs://`` with conditional PUTs)
are planned under the same interface (issue 13); until then :func:`open_storage` refuses their URIs with one line.
Array data does not go through this interface: TensorStore reads and writes it through :meth:`Storage.kvstore`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from lepton_jax.errors import LakeError
from lepton_jax.lake.publish import publish_new
from lepton_jax.lake.uri import local_root


class Storage(Protocol):
    """The backend primitives a lake is built on."""

    uri: str

    def read(self, key: str) -> bytes:
        """The object's bytes; :class:`FileNotFoundError` if there is none."""

    def create(self, key: str, payload: bytes, *, temp_prefix: str = ".publish-") -> bool:
        """Atomic, durable create-if-absent: True if this call created ``key``, False if it existed."""

    def list(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` (a ``/``-terminated key prefix), sorted; empty if none."""

    def delete(self, key: str) -> None:
        """Removes ``key`` (no error if it is absent)."""

    def kvstore(self, key: str) -> dict[str, Any]:
        """A TensorStore kvstore spec for the prefix ``key``."""


class LocalStorage:
    """A lake on a local (or network-mounted POSIX) directory."""

    def __init__(self, root: str | Path):
        self.root = local_root(root)
        self.uri = str(self.root)

    def path(self, key: str) -> Path:
        parts = key.strip("/").split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise LakeError(f"invalid lake key {key!r}")
        return self.root.joinpath(*parts)

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def create(self, key: str, payload: bytes, *, temp_prefix: str = ".publish-") -> bool:
        return publish_new(self.path(key), payload, temp_prefix=temp_prefix)

    def list(self, prefix: str) -> list[str]:
        directory = self.path(prefix) if prefix.strip("/") else self.root
        try:
            return sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def kvstore(self, key: str) -> dict[str, Any]:
        return {"driver": "file", "path": str(self.path(key)) + "/"}


def open_storage(uri: str | Path) -> LocalStorage:
    """The storage of a lake root: a local path or ``file://`` URI (other schemes are refused with one line)."""
    return LocalStorage(uri)
