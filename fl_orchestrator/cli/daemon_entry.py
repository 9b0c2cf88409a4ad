"""The `fl-orchestratord` console script: signal handlers first, everything else after.

Importing the daemon (numpy, anyio, the strategies) takes a few hundred
milliseconds. A SIGTERM in that time would kill the process with the
kernel's default action; here it is only remembered, and the daemon stops
cleanly (exit 0) as soon as it can listen for signals itself.
"""

from __future__ import annotations

import signal
import sys


def run() -> None:
    """Remember stop signals, then load and run the daemon."""
    stop_requests: list[int] = []

    def remember(signum: int, frame: object) -> None:
        stop_requests.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, remember)
    from fl_orchestrator.cli.daemon_main import main

    sys.exit(main(stop_requests=stop_requests))


if __name__ == "__main__":
    run()
