"""The state directory: private to the daemon's user, and used by one daemon at a time.

It holds run output (``reports.sqlite3`` and its WAL, the report spool), the
learned SSH host keys and the API tokens' hashes: :func:`private_dir` creates it
(and each directory below it) mode 0700, and :func:`private_file` its files 0600,
whatever the daemon's umask (which its jobs inherit, so it is left alone).
:func:`acquire_state_lock` keeps a second daemon out of it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) if needed; make it mode 0700."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != PRIVATE_DIR:
        os.chmod(path, PRIVATE_DIR)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty if it does not exist; make it mode 0600."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        if os.fstat(fd).st_mode & 0o777 != PRIVATE_FILE:
            os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    return path


class StateDirLocked(Exception):
    """Another process (a second daemon) holds the state directory."""

    def __init__(self, path: Path, pid: int | None) -> None:
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"state directory lock {path} is held by {holder}")
        self.path = path
        self.pid = pid


class StateLock:
    """An exclusive ``flock`` on ``<state_dir>/distcrond.lock``; released by ``release()``,
    by leaving its ``with`` block, or when the process dies."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_state_lock(state_dir: Path | str) -> StateLock:
    """Take the state directory for this process, or fail at once.

    Raises :class:`StateDirLocked` (naming the lock file and, when it can be
    read, the holder's pid) if another daemon holds it. API workers do not take it.
    """
    path = Path(state_dir) / "distcrond.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder: int | None = None
        with contextlib.suppress(OSError, ValueError):
            holder = int(os.pread(fd, 32, 0).decode().strip() or "0") or None
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StateDirLocked(path, holder) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StateLock(path, fd)
