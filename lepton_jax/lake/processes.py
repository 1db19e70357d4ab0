"""Processes as the lake sees them: telling a live process from a dead one whose pid was reused (leases), and worker
processes that end when the process they work for dies (ingest's pool).

Linux-first: a process's start time comes from ``/proc``, and a worker watches the ingest process through a pidfd
(``os.pidfd_open``, Linux 5.3+), polling twice a second where there is none.
"""

from __future__ import annotations

import os
import select
import threading
from pathlib import Path
from typing import Any

WATCH_POLL_SECONDS = 0.5  # how often a worker without pidfds checks that its ingest process lives


def pid_namespace() -> str | None:
    """This boot and PID namespace (``<boot id>/pid:[inode]``): pids and their start times mean the same process
    only within one; a container with the host's name (host networking) sees other pids. None if unknown."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def process_start(pid: Any) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (tells a reused pid apart), None if unknown."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError, TypeError):
        return None


def die_with(pid: int, start: int | None) -> None:
    """Makes this process exit (status 1, at once: no cleanup, the work is abandoned) when process ``pid``, started
    at ``start``, ends — by any cause, SIGKILL included. A pool's initializer: an ingest's workers are forked from
    a fork server, so a parent-death signal would tie them to the server, not to the ingest, and a worker waiting for
    its next chunk would otherwise wait for ever."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if process_start(pid) != start:  # already gone (and perhaps its pid reused)
        os._exit(1)

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has ended
        else:
            while pid_alive(pid) and process_start(pid) == start:
                threading.Event().wait(WATCH_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name=f"die-with-{pid}", daemon=True).start()
