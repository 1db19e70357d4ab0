"""Where a lake's keys live: one interface over a local directory and object stores (S3, GCS).

A key is a ``/``-separated path relative to the lake root (``<table>/_log/00000001.json``). The lake's metadata
(commit records, ``_used`` markers, leases, row hashes, quarantine lists) goes through :class:`Storage`; array data
goes through TensorStore's own kvstore drivers, whose spec :meth:`Storage.kvstore` gives. The commit point is
:meth:`Storage.create`, an atomic **create-if-absent**:

- :class:`LocalStorage` (a path or ``file://``): ``os.link`` from an fsynced temp file (``O_CREAT|O_EXCL`` where there
  are no hard links), directories fsynced; :meth:`Storage.sync` fsyncs written trees.
- :class:`ObjectStorage` (``s3://bucket/prefix``, ``gs://bucket/prefix``) through ``obstore``: a conditional PUT
  (``If-None-Match: *`` on S3, ``ifGenerationMatch=0`` on GCS), which the store refuses if the key exists. A PUT is
  durable when it returns, so :meth:`Storage.sync` does nothing. Credentials come from the standard environment
  (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` for an
  S3-compatible server, instance/container roles; a named profile must be exported first, e.g.
  ``eval "$(aws configure export-credentials --profile NAME --format env)"``; ``GOOGLE_APPLICATION_CREDENTIALS`` for
  GCS) and are never logged.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from lepton_jax.errors import LakeError
from lepton_jax.files import atomic_write, fsync_dir
from lepton_jax.lake.publish import publish_new
from lepton_jax.lake.uri import parse_root

log = logging.getLogger(__name__)


class Storage(Protocol):
    """The backend primitives a lake is built on (keys are relative to the lake root)."""

    uri: str

    def read(self, key: str) -> bytes:
        """The object's bytes; :class:`FileNotFoundError` if there is none."""

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of the object from ``start`` (fewer at its end); :class:`FileNotFoundError` if none."""

    def create(self, key: str, payload: bytes, *, temp_prefix: str = ".publish-") -> bool:
        """Atomic, durable create-if-absent: True if this call created ``key``, False if it existed."""

    def write(self, key: str, payload: bytes, *, durable: bool = True) -> None:
        """Durable put that replaces ``key`` whole if it exists (readers see the old or the new bytes); without
        ``durable`` (what only matters while its writer lives: a lease) a crash of the machine may lose it."""

    def list(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` (a ``/``-terminated key prefix): objects and sub-prefixes, sorted."""

    def list_recursive(self, prefix: str) -> dict[str, tuple[int, float]]:
        """Every object under ``prefix`` (a key, no trailing ``/``): ``{path relative to it: (bytes, mtime)}``."""

    def stat(self, key: str) -> tuple[int, float] | None:
        """``(bytes, last-modified time)`` of the object ``key``, None if there is none."""

    def tree(self, key: str) -> tuple[int, float] | None:
        """``(total bytes, newest last-modified time)`` of ``key`` and everything under it; None if nothing."""

    def exists(self, key: str) -> bool:
        """Whether the object ``key`` exists."""

    def sha256(self, key: str) -> str:
        """The sha256 of the object's bytes (streamed)."""

    def delete(self, key: str) -> None:
        """Removes ``key`` (no error if it is absent)."""

    def delete_prefix(self, key: str) -> None:
        """Removes ``key`` and everything under it (no error if absent; objects vanishing meanwhile are fine)."""

    def prune(self, *keys: str) -> None:
        """Removes the empty directories ``keys`` in order, stopping at the first that is not empty (local only)."""

    def sync(self, key: str, *, tree: bool = True, up: bool = True, files: bool = True) -> None:
        """Makes ``key`` (with ``tree``: every file and directory under it; without ``files`` only the directories
        outside arrays, for a tree whose files and arrays were made durable as they were written: an array's writer
        syncs its files and directories when it completes) and its directory entries up to the root (without ``up``:
        only those inside ``key``; for data under a commit directory, which the commit syncs up to the root before
        it publishes) durable."""

    def local_path(self, key: str) -> Path | None:
        """The local file system path of ``key``; None on an object store."""

    def describe(self, key: str) -> str:
        """``key`` as a path or URI for messages."""

    def kvstore(self, key: str) -> dict[str, Any]:
        """A TensorStore kvstore spec for the prefix ``key``."""


def _check_key(key: str) -> list[str]:
    parts = key.strip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise LakeError(f"invalid lake key {key!r}")
    return parts


ARRAY_METADATA = "zarr.json"  # the file that makes a directory a (zarr v3) array
CLOCK_PROBE_PREFIX = "_clock-probe-"  # + random hex: an empty object written and removed by storage_clock


def storage_clock(storage: Storage) -> float:
    """Now, by the storage's clock: the last-modified time of an empty probe object written (and removed) at the
    root. Garbage collectors age data by the storage's timestamps, so they must not compare them with this machine's
    clock, which may run ahead of the object store's (or the file server's). Falls back to this machine's clock,
    with a warning, where the probe cannot be written (read-only credentials)."""
    key = f"{CLOCK_PROBE_PREFIX}{uuid.uuid4().hex}"
    found = None
    try:
        storage.write(key, b"")
        found = storage.stat(key)
    except (OSError, LakeError) as e:
        log.warning("cannot write a clock probe at %s (%s); using this machine's clock", storage.describe(key), e)
    finally:
        with contextlib.suppress(OSError, LakeError):
            storage.delete(key)
    return found[1] if found is not None else time.time()


class LocalStorage:
    """A lake on a local (or network-mounted POSIX) directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def path(self, key: str) -> Path:
        if not key.strip("/"):
            return self.root
        return self.root.joinpath(*_check_key(key))

    def local_path(self, key: str) -> Path | None:
        return self.path(key)

    def describe(self, key: str) -> str:
        return str(self.path(key))

    def read(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with open(self.path(key), "rb") as f:
            return os.pread(f.fileno(), length, start)

    def create(self, key: str, payload: bytes, *, temp_prefix: str = ".publish-") -> bool:
        return publish_new(self.path(key), payload, temp_prefix=temp_prefix)

    def write(self, key: str, payload: bytes, *, durable: bool = True) -> None:
        with atomic_write(self.path(key), "wb", durable=durable, fsync=durable) as f:
            f.write(payload)

    def list(self, prefix: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list_recursive(self, prefix: str) -> dict[str, tuple[int, float]]:
        base = self.path(prefix)
        out = {}
        for p in sorted(base.rglob("*")) if base.is_dir() else []:
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                if p.is_file():
                    out[p.relative_to(base).as_posix()] = (st.st_size, st.st_mtime)
        return out

    def stat(self, key: str) -> tuple[int, float] | None:
        try:
            st = self.path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (st.st_size, st.st_mtime) if not self.path(key).is_dir() else None

    def tree(self, key: str) -> tuple[int, float] | None:
        path = self.path(key)
        try:
            newest = path.lstat().st_mtime
        except FileNotFoundError:
            return None
        total = path.stat().st_size if path.is_file() else 0
        if path.is_dir():
            for p in path.rglob("*"):
                with contextlib.suppress(FileNotFoundError):
                    st = p.lstat()
                    newest = max(newest, st.st_mtime)
                    total += st.st_size if p.is_file() else 0
        return total, newest

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def sha256(self, key: str) -> str:
        h = hashlib.sha256()
        with open(self.path(key), "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
        return h.hexdigest()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir() and not path.is_symlink():
            def onerror(func, p, exc_info):
                if not isinstance(exc_info[1], FileNotFoundError):
                    raise exc_info[1]
            shutil.rmtree(path, onerror=onerror)
        else:
            path.unlink(missing_ok=True)

    def prune(self, *keys: str) -> None:
        for key in keys:
            try:
                self.path(key).rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break

    def sync(self, key: str, *, tree: bool = True, up: bool = True, files: bool = True) -> None:
        path = self.path(key)
        synced = False  # whether path itself was fsynced by the walk below
        if tree and path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                if not files and ARRAY_METADATA in filenames:  # an array, synced whole by its writer
                    dirnames.clear()
                    continue
                for name in filenames if files else ():
                    fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                fsync_dir(Path(dirpath))
                synced = synced or dirpath == str(path)
        elif tree and files and path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if not up:
            return
        p = path if path.is_dir() else path.parent
        while True:  # directory entries from here up to the lake root
            if p.is_dir() and not (synced and p == path):
                fsync_dir(p)
            if p == self.root or p.parent == p or self.root not in p.parents:
                break
            p = p.parent

    def kvstore(self, key: str) -> dict[str, Any]:
        return {"driver": "file", "path": str(self.path(key)) + "/"}


class ObjectStorage:
    """A lake under ``s3://bucket/prefix`` or ``gs://bucket/prefix``, through ``obstore`` (metadata) and
    TensorStore's ``s3``/``gcs`` kvstore drivers (arrays)."""

    def __init__(self, scheme: str, bucket: str, prefix: str):
        self.scheme, self.bucket, self.prefix = scheme, bucket, prefix.strip("/")
        self.uri = f"{scheme}://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.root = self.uri
        self._store = None

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    @property
    def store(self):
        if self._store is None:
            self._store = _make_store(self.scheme, self.bucket, self.prefix)
        return self._store

    def _call(self, what: str, key: str, fn, *args, **kwargs):
        import obstore.exceptions as oe

        try:
            return fn(self.store, *args, **kwargs)
        except FileNotFoundError:
            raise
        except oe.NotFoundError as e:
            raise FileNotFoundError(f"{self.describe(key)}: not found") from e
        except (oe.BaseError, OSError, ValueError, RuntimeError) as e:
            raise LakeError(f"lake {self.uri}: {what} {key or '/'} failed: {_explain(e)}") from e

    def local_path(self, key: str) -> Path | None:
        return None

    def describe(self, key: str) -> str:
        return f"{self.uri}/{key.strip('/')}" if key.strip("/") else self.uri

    def read(self, key: str) -> bytes:
        import obstore

        _check_key(key)
        return bytes(self._call("read", key, lambda s: obstore.get(s, key).bytes()))

    def read_range(self, key: str, start: int, length: int) -> bytes:
        import obstore

        _check_key(key)
        if length <= 0:
            return b""
        return bytes(self._call("read", key, obstore.get_range, key, start=start, length=length))

    def create(self, key: str, payload: bytes, *, temp_prefix: str = ".publish-") -> bool:
        import obstore
        import obstore.exceptions as oe

        _check_key(key)
        try:
            self._call("create", key, obstore.put, key, payload, mode="create")
        except LakeError as e:
            if isinstance(e.__cause__, oe.AlreadyExistsError | oe.PreconditionError):
                return False
            raise
        return True

    def write(self, key: str, payload: bytes, *, durable: bool = True) -> None:
        import obstore

        _check_key(key)
        self._call("write", key, obstore.put, key, payload)

    def list(self, prefix: str) -> list[str]:
        import obstore

        p = prefix.strip("/")
        out = self._call("list", p, obstore.list_with_delimiter, p or None)
        names = [c.rstrip("/").rsplit("/", 1)[-1] for c in out["common_prefixes"]]
        names += [o["path"].rsplit("/", 1)[-1] for o in out["objects"]]
        return sorted(set(names))

    def list_recursive(self, prefix: str) -> dict[str, tuple[int, float]]:
        import obstore

        p = prefix.strip("/")
        _check_key(p)
        batches = self._call("list", p, lambda s: list(obstore.list(s, p)))
        return {o["path"][len(p) + 1:]: (int(o["size"]), o["last_modified"].timestamp())
                for batch in batches for o in batch}

    def stat(self, key: str) -> tuple[int, float] | None:
        import obstore

        _check_key(key)
        try:
            meta = self._call("stat", key, obstore.head, key)
        except FileNotFoundError:
            return None
        return int(meta["size"]), meta["last_modified"].timestamp()

    def tree(self, key: str) -> tuple[int, float] | None:
        items = list(self.list_recursive(key).values())
        own = self.stat(key)
        if own is not None:
            items.append(own)
        if not items:
            return None
        return sum(s for s, _ in items), max(t for _, t in items)

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def sha256(self, key: str) -> str:
        import obstore

        _check_key(key)
        h = hashlib.sha256()

        def stream(s):
            for chunk in obstore.get(s, key).stream():
                h.update(memoryview(chunk))
        self._call("read", key, stream)
        return h.hexdigest()

    def delete(self, key: str) -> None:
        import obstore

        _check_key(key)
        with contextlib.suppress(FileNotFoundError):
            self._call("delete", key, obstore.delete, key)

    def delete_prefix(self, key: str) -> None:
        import obstore

        p = key.strip("/")
        paths = [f"{p}/{rel}" for rel in self.list_recursive(p)]
        if self.stat(p) is not None:
            paths.append(p)
        for start in range(0, len(paths), 1000):
            with contextlib.suppress(FileNotFoundError):
                self._call("delete", p, obstore.delete, paths[start:start + 1000])

    def prune(self, *keys: str) -> None:
        return None  # object stores have no directories

    def sync(self, key: str, *, tree: bool = True, up: bool = True, files: bool = True) -> None:
        return None  # a PUT is durable when it returns

    def kvstore(self, key: str) -> dict[str, Any]:
        path = "/".join(p for p in (self.prefix, key.strip("/")) if p) + "/"
        if self.scheme == "gs":
            return {"driver": "gcs", "bucket": self.bucket, "path": path}
        spec: dict[str, Any] = {"driver": "s3", "bucket": self.bucket, "path": path}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            spec["endpoint"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            spec["aws_region"] = region
        if os.environ.get("AWS_ACCESS_KEY_ID"):  # keys in the environment: use them, without probing the rest of
            spec["aws_credentials"] = {"type": "environment"}  # the chain (which logs every provider it misses)
        return spec


def _explain(e: BaseException) -> str:
    """The likely cause of an object-store error in words, then the error itself on one line (never credentials:
    obstore's errors hold none)."""
    import obstore.exceptions as oe

    text = str(e)
    if "NoSuchBucket" in text:
        cause = "the bucket does not exist"
    elif "169.254.169.254" in text or "credential" in text.lower():
        cause = ("no credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, e.g. from a profile with "
                 "`aws configure export-credentials --format env`, or run with an instance role; "
                 "GOOGLE_APPLICATION_CREDENTIALS for gs://)")
    elif isinstance(e, oe.UnauthenticatedError | oe.PermissionDeniedError) or "AccessDenied" in text \
            or "SignatureDoesNotMatch" in text or "InvalidAccessKeyId" in text:
        cause = "access denied: check the credentials and the bucket's permissions"
    elif "Connection refused" in text or "error sending request" in text or "dns error" in text \
            or "timed out" in text.lower():
        cause = "the endpoint is unreachable (check AWS_ENDPOINT_URL / the network)"
    else:
        return _one_line(e)
    return f"{cause} [{_one_line(e)[:160]}]"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(e).__name__


def _make_store(scheme: str, bucket: str, prefix: str):
    from obstore.store import GCSStore, S3Store

    retry = {"max_retries": 3, "retry_timeout": datetime.timedelta(seconds=20),
             "backoff": {"init_backoff": datetime.timedelta(milliseconds=100),
                         "max_backoff": datetime.timedelta(seconds=2), "base": 2.0}}
    client = {"connect_timeout": "5s", "timeout": "120s"}
    if scheme == "gs":
        return GCSStore(bucket, prefix=prefix or None, client_options=client, retry_config=retry)
    kwargs: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint"] = endpoint
        if endpoint.startswith("http://"):
            client["allow_http"] = True
    try:
        return S3Store(bucket, prefix=prefix or None, client_options=client, retry_config=retry, **kwargs)
    except Exception as e:  # bad configuration (region, endpoint): one line, no credentials in it
        raise LakeError(f"lake s3://{bucket}/{prefix}: cannot configure the S3 client: {_one_line(e)}") from e


def open_storage(uri: str | Path) -> LocalStorage | ObjectStorage:
    """The storage of a lake root: a local path or ``file://`` URI, ``s3://bucket/prefix`` or ``gs://bucket/prefix``
    (other schemes are refused with one line)."""
    scheme, location = parse_root(uri)
    if scheme == "file":
        return LocalStorage(location)
    bucket, _, prefix = str(location).partition("/")
    return ObjectStorage(scheme, bucket, prefix)
