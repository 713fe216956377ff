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

Where a lock cannot work, it is refused rather than trusted: on FUSE filesystems (gcsfuse, s3fs,
sshfs, ...) a lock taken here does not stop a run on another machine (``PAUSEREC_LOCAL_LOCK=1`` says
only this machine writes there). NFS carries ``flock`` to the server as a POSIX lock (Linux 2.6.12
and later). A lock file another user left behind (a run killed before it could remove it) is locked
through a read-only descriptor, which ``flock`` accepts; one that cannot be opened at all is named
with its owner and what to do.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
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


LOCAL_ONLY_FS = ("fuse",)  # filesystem types (prefixes) whose locks do not reach other machines
LOCAL_LOCK_ENV = "PAUSEREC_LOCAL_LOCK"


def mount_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The filesystem type of the mount that holds ``path`` (from /proc/self/mountinfo), or None where unknown."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields or len(fields) < 5:
            continue
        mnt = fields[4].replace("\\040", " ")
        fstype = fields[fields.index("-") + 1]
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, fstype
    return kind


def _check_lockable(lock_path: Path, what: str) -> None:
    kind = mount_type(lock_path.parent)
    if kind and kind.startswith(LOCAL_ONLY_FS) and os.environ.get(LOCAL_LOCK_ENV) != "1":
        raise LockedError(f"{what}: the lock file {lock_path} is on a {kind} filesystem, where a lock taken here does "
                          "not stop a run on another machine. Write to a local or NFS disk (and copy the result), or "
                          f"set {LOCAL_LOCK_ENV}=1 if only this machine ever writes there")


def _open(lock_path: Path, what: str) -> tuple[int, bool]:
    """(descriptor, writable) of the lock file; a file another user left is opened read-only (flock accepts it)."""
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644), True
    except PermissionError as e:
        try:
            return os.open(lock_path, os.O_RDONLY), False
        except FileNotFoundError:
            raise LockedError(f"{what}: cannot create the lock file {lock_path} ({e.strerror}): write the output to a "
                              "folder you can write") from None
        except PermissionError:
            try:
                owner = pwd.getpwuid(lock_path.stat().st_uid).pw_name
            except (KeyError, OSError):
                owner = "another user"
            raise LockedError(f"{what}: the lock file {lock_path} belongs to {owner} and cannot be opened: a run of "
                              f"theirs holds it or left it. Ask them; if no run of theirs is going, remove the file "
                              f"(rm {lock_path})") from None


@contextmanager
def hold(lock_path: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the exclusive lock ``lock_path`` (created if missing) for ``what``; see the module docstring."""
    lock_path = Path(lock_path)
    _check_lockable(lock_path, what)
    while True:
        fd, writable = _open(lock_path, what)
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
        if writable:  # (another user's file: its old details stay; the lock itself is what counts)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
        yield
    finally:
        try:
            os.unlink(lock_path)  # still holding it: a waiter sees the inode change and locks anew
        except OSError:  # gone already, or another user's file in a folder we may not change
            pass
        os.close(fd)
