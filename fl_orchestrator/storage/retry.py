"""One retry rule for every write that matters: back off, keep trying, then give up once.

A full disk, a permission change or a read-only remount often passes within
seconds. Each state write (model, checkpoint, round log, metrics, status,
tasks, quarantine records) goes through ``WriteRetry``: a failure is logged
and tried again with backoff until ``retry_seconds`` have passed since the
first failure; only then is one ``state.write_gave_up`` line logged and
``StateWriteError`` raised, which the daemon turns into exit 74 without
marking the run failed, so a plain restart resumes it.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import anyio
import structlog

log = structlog.get_logger("fl_orchestrator.storage")

EX_IOERR = 74
T = TypeVar("T")
_FIRST_DELAY_SECONDS = 0.1
_MAX_DELAY_SECONDS = 2.0


class StateWriteError(Exception):
    """A state write still failed after ``write_retry_seconds`` of retries."""

    def __init__(self, what: str, path: Path, error: OSError) -> None:
        self.what = what
        self.path = path
        self.errno_name = errno.errorcode.get(error.errno or 0, "EIO")
        super().__init__(f"cannot write {what} at {path}: {error.strerror or error} ({self.errno_name})")


class _Attempts:
    """Backoff bookkeeping shared by the blocking and the async runner."""

    def __init__(self, retry_seconds: float, what: str, path: Path) -> None:
        self.retry_seconds = retry_seconds
        self.what = what
        self.path = path
        self.first_failure: float | None = None
        self.delay = _FIRST_DELAY_SECONDS
        self.failures = 0

    def failed(self, exc: OSError) -> float:
        """Log the failure and return how long to wait; raise once the retry time is spent."""
        now = time.monotonic()
        if self.first_failure is None:
            self.first_failure = now
        self.failures += 1
        left = self.first_failure + self.retry_seconds - now
        code = errno.errorcode.get(exc.errno or 0, "EIO")
        if left <= 0:
            log.error(
                "state.write_gave_up",
                what=self.what,
                path=str(self.path),
                errno=code,
                error=exc.strerror or str(exc),
                failures=self.failures,
                retried_seconds=round(now - self.first_failure, 3),
            )
            raise StateWriteError(self.what, self.path, exc) from None
        wait = min(self.delay, left)
        log.warning(
            "state.write_failed",
            what=self.what,
            path=str(self.path),
            errno=code,
            error=exc.strerror or str(exc),
            retry_in_seconds=round(wait, 3),
            gives_up_in_seconds=round(left, 3),
        )
        self.delay = min(self.delay * 2, _MAX_DELAY_SECONDS)
        return wait

    def succeeded(self) -> None:
        if self.first_failure is not None:
            log.warning(
                "state.write_recovered",
                what=self.what,
                path=str(self.path),
                failures=self.failures,
                after_seconds=round(time.monotonic() - self.first_failure, 3),
            )


class WriteRetry:
    """Runs writes, retrying OSError for up to ``retry_seconds`` (0: fail at once)."""

    def __init__(self, retry_seconds: float) -> None:
        self.retry_seconds = retry_seconds

    async def run(self, write: Callable[[], T], *, what: str, path: Path) -> T:
        """Run ``write`` in a worker thread until it succeeds or the retry time is spent."""
        attempts = _Attempts(self.retry_seconds, what, path)
        while True:
            try:
                result = await anyio.to_thread.run_sync(write)
            except OSError as exc:
                await anyio.sleep(attempts.failed(exc))
                continue
            attempts.succeeded()
            return result

    def run_blocking(self, write: Callable[[], T], *, what: str, path: Path) -> T:
        """The same, in the calling thread (start-up, and writes already in a worker thread)."""
        attempts = _Attempts(self.retry_seconds, what, path)
        while True:
            try:
                result = write()
            except OSError as exc:
                time.sleep(attempts.failed(exc))
                continue
            attempts.succeeded()
            return result
