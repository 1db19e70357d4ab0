"""Durable, exclusive publishing of small records (commit records, registry entries) on a local filesystem.

:func:`publish_new` writes the payload to a temp file in the target's directory (created with mode 0666 minus the
umask, so records are as readable as data files), fsyncs it, and makes it visible with ``os.link`` — an atomic
create-if-absent: if the name exists the link fails and nothing is overwritten. On filesystems without hard links it
falls back to an ``O_CREAT|O_EXCL`` create of the final name (still exclusive; a crash while its few bytes are
written can leave that one record unreadable, which ``lake verify`` and ``lake ls`` name). The directory is fsynced
afterwards, and directories created on the way (a table's first commit) have their parents fsynced too.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from lepton_jax.errors import LakeError
from lepton_jax.files import fsync_dir, make_dirs
from lepton_jax.lake.faults import crash_point

#: errno values of ``os.link`` that mean "this filesystem has no hard links" (then the O_EXCL fallback is used)
NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS, errno.EMLINK})


def write_file(path: Path, payload: bytes) -> None:
    """Creates, writes and fsyncs ``path``, which must not exist yet (mode 0666 minus the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_new(path: Path, payload: bytes, *, temp_prefix: str = ".publish-") -> bool:
    """Publishes ``payload`` at ``path`` if no file has that name: True if this call created it, False if it
    existed. The temp file is named ``<temp_prefix><random>`` in the same directory."""
    path = Path(path)
    make_dirs(path.parent)
    tmp = path.parent / f"{temp_prefix}{uuid.uuid4().hex}"
    write_file(tmp, payload)
    try:
        crash_point("record")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except FileNotFoundError as e:
            raise LakeError(f"the temp record {tmp} vanished before it was published (removed by `lake gc "
                            "--force`?); nothing was published, run the commit again") from e
        except OSError as e:
            if e.errno not in NO_HARD_LINKS:
                raise LakeError(f"cannot publish {path}: {e.strerror or e}") from e
            try:  # no hard links here: exclusive create of the final name instead
                write_file(path, payload)
            except FileExistsError:
                return False
        crash_point("published")
        fsync_dir(path.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)
