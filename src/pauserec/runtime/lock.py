"""One writer at a time: an advisory file lock that dies with its process.

``hold(lock_path, what)`` takes an exclusive ``flock`` on ``lock_path`` for the duration of a
``with`` block. The kernel releases it when the process exits, however it exits (``kill -9``
included), so a killed run never blocks the next one; nothing has to be cleaned up by hand.

- ``wait=False`` (jobs): a second run is refused at once with :class:`LockedError`, whose message
  names the holder (pid, host, start time, command line) read from the lock file.
- ``wait=True`` (the engine cache): the second process waits for the first to finish.

The lock file is removed by its holder on release. A process that opened the old file just before
it was removed could lock a file that is no longer there, so after locking, the path is checked
to still be the file locked (same inode), and the lock is taken again otherwise.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pauserec.errors import PauserecError


class LockedError(PauserecError):
    """Another process holds the lock (its message names it)."""


def holder_text(lock_path: Path, wait_s: float = 1.0) -> str:
    """Who holds ``lock_path``, as the holder wrote it (or what is known when it cannot be read). The holder
    writes its details just after it takes the lock, so an empty file is read again for up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            info = json.loads(lock_path.read_text())
            return (f"pid {info['pid']} on {info['host']}, started {info['started']}"
                    + (f" ({info['command']})" if info.get("command") else ""))
        except (OSError, ValueError, KeyError):
            if time.monotonic() > deadline:
                return "a process whose details could not be read"
            time.sleep(0.02)


@contextmanager
def hold(lock_path: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the exclusive lock ``lock_path`` (created if missing) for ``what``; see the module docstring."""
    lock_path = Path(lock_path)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"{what} is being written by another run: {holder_text(lock_path)}. Wait for it to "
                              f"finish or stop it; a run that died releases the lock by itself ({lock_path})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file we locked: lock the current one
        time.sleep(0.01)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]) if sys.argv and sys.argv[0] else ""}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield
    finally:
        try:
            os.unlink(lock_path)  # still holding it: a waiter sees the inode change and locks anew
        except FileNotFoundError:
            pass
        os.close(fd)
