"""The ``file.rejected`` log lines, at most a burst per datasite per second.

A datasite that floods its folder with junk would otherwise write one line
per file: a 10,000-file flood used up journald's default burst (10,000
messages per 30 s per service), after which the daemon's other lines were
dropped, and writing the lines was a tenth of the cost of a refusal. Past
``burst`` lines in a second, a datasite's refusals are only counted; the
counts go out as one ``file.rejected.unlogged`` line when its next line is
allowed, or when the intake runs dry (``flush``). Every refusal still has its
record in the quarantine, whether it was logged or not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("fl_orchestrator.quarantine")

LINES_PER_SECOND = 20


class RefusalLog:
    """Logs refusals, with each datasite's lines beyond ``burst`` a second counted instead."""

    def __init__(self, burst: int = LINES_PER_SECOND, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.clock = clock
        self._window: dict[str, tuple[float, int]] = {}  # bucket: (window start, lines in it)
        self._unlogged: dict[str, dict[str, int]] = {}  # bucket: reason: count
        self._lock = threading.Lock()
        self._final = False

    def rejected(self, bucket: str, reason: str, records: str | None, **fields: object) -> None:
        """One ``file.rejected`` line, or a count if ``bucket`` used up its lines this second."""
        now = self.clock()
        with self._lock:
            start, lines = self._window.get(bucket, (now, 0))
            if now - start >= 1.0:
                start, lines = now, 0
            if lines >= self.burst and not self._final:
                per_reason = self._unlogged.setdefault(bucket, {})
                per_reason[reason] = per_reason.get(reason, 0) + 1
                self._window[bucket] = (start, lines)
                return
            self._window[bucket] = (start, lines + 1)
            unlogged = self._unlogged.pop(bucket, None)
        if unlogged:
            self._summary(bucket, unlogged, records)
        log.warning("file.rejected", reason=reason, record=records, **fields)

    def flush(self, records_of: Callable[[str], str], *, final: bool = False) -> None:
        """Log what is still only counted, one line per datasite (the intake has run dry).

        ``final``: the intake stopped; every later refusal gets its own line.
        """
        with self._lock:
            pending, self._unlogged = self._unlogged, {}
            self._final = self._final or final
        for bucket, unlogged in sorted(pending.items()):
            self._summary(bucket, unlogged, records_of(bucket))

    def _summary(self, bucket: str, unlogged: dict[str, int], records: str | None) -> None:
        log.warning(
            "file.rejected.unlogged",
            datasite=bucket,
            refused=sum(unlogged.values()),
            reasons=dict(sorted(unlogged.items())),
            records=records,
            hint=f"more than {self.burst} files a second were refused: each one's reason is in its record",
        )
