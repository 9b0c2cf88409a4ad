"""One decoded result in memory at a time: the intake reads the next only once the last is let go.

The round loop folds a result in a worker thread while the intake could already
be reading the next one; that read-ahead is a second decoded model in memory
(#19: the daemon's peak was model + sum + two results). The gate closes when the
intake sends a result and opens when the round loop reports it folded or refused.
"""

from __future__ import annotations

import anyio
import structlog

log = structlog.get_logger("fl_orchestrator.intake")


class FoldGate:
    """Open until a result is sent; then closed until ``release`` or the bound expires."""

    def __init__(self, bound_seconds: float) -> None:
        # The round loop's own bound on a fold and an aggregate: the gate outlasts it only if a
        # release was lost, and then it costs a delay, never a stalled intake.
        self.bound_seconds = bound_seconds
        self._released: anyio.Event | None = None

    def close(self) -> None:
        """A decoded result is on its way to the round loop."""
        self._released = anyio.Event()

    def release(self) -> None:
        """The round loop is done with the result sent last (folded or refused)."""
        if self._released is not None:
            self._released.set()

    async def passed(self) -> None:
        """Return once the result sent last is let go (at once if none is out)."""
        released = self._released
        if released is None:
            return
        with anyio.move_on_after(self.bound_seconds) as waited:
            await released.wait()
        self._released = None
        if waited.cancelled_caught:
            log.warning("intake.fold_wait_expired", waited_seconds=self.bound_seconds)
