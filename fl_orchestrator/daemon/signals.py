"""SIGTERM and SIGINT while the daemon runs: every handler is installed here, and restored here.

The first signal cancels the root scope: the daemon drains within
``daemon.shutdown_timeout_seconds`` and exits 0. A second one while draining
exits at once with 128 + its number. Signals that came before the daemon
listened (cli/daemon_entry.py remembers them) count as a first signal.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import anyio
import structlog

log = structlog.get_logger("fl_orchestrator.daemon")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
Handler = Callable[[int, Any], Any] | int | None


class StopSignals:
    """Listens for stop signals during the run; makes a second one final while draining."""

    def __init__(self, earlier: list[int]) -> None:
        self.earlier = earlier
        self.stopping = False
        self._previous: dict[int, Handler] = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    async def listen(self, scope: anyio.CancelScope) -> None:
        """Cancel ``scope`` on the first stop signal (a root task; it ends with the scope)."""
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            if self.earlier:  # arrived while starting: stop now, exactly as for a live one
                self._stop(scope, self.earlier[0])
            async for signum in signals:
                self._stop(scope, signum)

    def _stop(self, scope: anyio.CancelScope, signum: int) -> None:
        log.info("daemon.stopping", signal=signal.Signals(signum).name)
        self.stopping = True
        scope.cancel()

    def draining(self) -> None:
        """The root scope is gone and with it the listener: a second signal now exits at once."""
        if self.stopping:
            for signum in STOP_SIGNALS:
                signal.signal(signum, _exit_now)

    def restore(self) -> None:
        """Put back the handlers that were there before the daemon ran."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _exit_now(signum: int, frame: object) -> None:
    """A second SIGTERM/SIGINT while draining: exit without waiting for anything."""
    os.write(2, f"second signal {signum} while stopping: exiting now\n".encode())
    os._exit(128 + signum)
