"""A datasite that is not in the job but writes heartbeats for it: said now and then, never refused.

Such a datasite (an owner the operator forgot to list, a typo in an email) writes
a heartbeat every few seconds. Refusing and quarantining each one flooded the
log and the quarantine records every 2 s; instead one ``datasite.unlisted`` line
is logged per datasite per ``presence_ttl_seconds``, saying what to do.
"""

from __future__ import annotations

import time

import structlog

from fl_orchestrator.core.reasons import Reason, printable
from fl_orchestrator.intake.adapter import Outcome
from fl_orchestrator.intake.reader import Refused
from fl_orchestrator.wire.layout import Classified, FileKind

log = structlog.get_logger("fl_orchestrator.intake")

# Datasites remembered at most: strangers cannot grow it for ever.
_REMEMBERED = 4096


def unlisted_presence(outcome: Outcome, classified: Classified) -> bool:
    """True for a heartbeat from a datasite outside the job."""
    return (
        isinstance(outcome, Refused)
        and outcome.reason == Reason.UNKNOWN_DATASITE
        and classified.kind == FileKind.HEARTBEAT
    )


class UnlistedLog:
    """One ``datasite.unlisted`` line per datasite per ``every_seconds``."""

    def __init__(self, every_seconds: float) -> None:
        self.every_seconds = every_seconds
        self._said: dict[str, float] = {}

    def say(self, datasite: str) -> None:
        """Log that this datasite is not in the job, unless it was said recently."""
        now = time.monotonic()
        last = self._said.get(datasite)
        if last is not None and now - last < self.every_seconds:
            return
        if len(self._said) >= _REMEMBERED:
            self._said.clear()
        self._said[datasite] = now
        log.info(
            "datasite.unlisted",
            datasite=printable(datasite, 256),
            reason=str(Reason.UNKNOWN_DATASITE),
            hint="it writes heartbeats for this job but is not in [syftbox] datasites: add it to use it",
            next_in_seconds=self.every_seconds,
        )
