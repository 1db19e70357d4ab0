"""Atomic file writes: a temp file (or folder) next to the target, renamed into place when complete.

Unlike :mod:`tempfile` (which creates 0600 files and 0700 folders, modes a rename keeps), the temp file is created
with mode 0666 and the folder with 0777, both minus the process umask: what the CLI writes has the permissions an
ordinary ``open``/``mkdir`` would give it (0644/0755 under umask 022), so other users and service accounts can read
it wherever the umask allows.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def _temp_name(path: Path, suffix: str = "") -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"


def fsync_dir(path: str | Path) -> None:
    """fsyncs a folder, so the entries created in it (files, sub-folders, renames) survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | Path) -> None:
    """``mkdir -p path``, then fsyncs the parent of every folder it created, so they survive a crash."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for d in reversed(missing):
        fsync_dir(d.parent)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, newline: str | None = None,
                 durable: bool = False, fsync: bool = True) -> Iterator[IO]:
    """Opens a temp file in ``path``'s folder (created with its parents) for writing (``mode`` "w" or "wb"); when
    the block ends without an error the file is flushed, fsynced and renamed onto ``path``, and on an error it is
    removed, so ``path`` holds either its old content or the complete new one. Mode 0666 minus the umask.

    ``durable`` also fsyncs the folders: the parents of those it creates, and ``path``'s own after the rename, so
    that the new name itself survives a power loss (the lake's writes), not only the bytes behind it. Without
    ``fsync`` nothing is fsynced (still atomic: for what only matters while its writer lives, such as a lease)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    if durable:
        make_dirs(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, newline=newline) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)


@contextmanager
def temp_dir(target: str | Path) -> Iterator[Path]:
    """A new empty folder next to ``target`` (``target``'s parents are created), mode 0777 minus the umask, for
    building ``target``'s content before renaming the folder (or its files) into place; removed with whatever is
    left in it when the block ends."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
