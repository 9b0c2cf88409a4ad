"""Diagnostic stand-in for ``fl-orchestratord``: the same main(), plus a record of garbage-collector pauses.

Used only with ``run.py --trace-gc``. Pauses longer than 1 ms are kept in memory
(writing them as they happen could split a log line being printed) and printed
at exit as JSON lines ``{"event": "gc.pause", "started": <unix time>,
"ms": ..., "generation": ..., "collected": ...}``, after the daemon's own log.
"""

from __future__ import annotations

import atexit
import gc
import json
import sys
import time
from typing import Any

_pauses: list[dict[str, Any]] = []
_started = [0.0]


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started[0] = time.time()
        return
    took = time.time() - _started[0]
    if took > 0.001:
        _pauses.append(
            {
                "event": "gc.pause",
                "started": _started[0],
                "ms": round(took * 1e3, 3),
                "generation": info["generation"],
                "collected": info["collected"],
            }
        )


def _dump() -> None:
    for pause in _pauses:
        sys.stdout.write(json.dumps(pause) + "\n")
    sys.stdout.flush()


def main() -> None:
    """Run the daemon's main() with the collector traced."""
    from fl_orchestrator.cli.daemon_main import main as daemon_main

    gc.callbacks.append(_on_gc)
    atexit.register(_dump)
    sys.exit(daemon_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
