"""One daemon per state folder: an exclusive flock held for the process's whole life.

The kernel drops the lock when the process ends, kill -9 included, so there
is no stale lock to detect or clean. The holder writes its pid into the file
for the message a second daemon prints; the pid is informational only.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "daemon.lock"
EX_TEMPFAIL = 75


class LockHeld(Exception):
    """Another process holds the state folder's lock."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"{path} is locked by pid {holder}: another fl-orchestratord runs this job")


class StateLock:
    """The state folder's lock; ``acquire`` once, ``release`` (or exit) to drop it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise LockHeld naming the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(self.path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: deleting it would race a starting daemon)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
