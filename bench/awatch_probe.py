"""Baseline of the detection-latency benchmark: a bare watchfiles ``awatch`` on a folder.

Watches recursively with the daemon's debounce, step and filter (this job's
folders, no deletions, no ``*.tmp``), and prints one JSON line per batch:
``{"t": <time.time() on receipt>, "paths": [...]}``. Stopped by SIGTERM.

Usage: awatch_probe.py FOLDER MARKER DEBOUNCE_MS STEP_MS
"""

from __future__ import annotations

import json
import sys
import time

import anyio
from watchfiles import Change, awatch


async def probe(folder: str, marker: str, debounce: int, step: int) -> None:
    """Print every batch of changes under folder as it arrives."""

    def accept(change: Change, path: str) -> bool:
        return change != Change.deleted and marker in path and not path.endswith(".tmp")

    async for changes in awatch(
        folder,
        watch_filter=accept,
        debounce=debounce,
        step=step,
        recursive=True,
        ignore_permission_denied=True,
    ):
        now = time.time()
        print(json.dumps({"t": now, "paths": sorted({path for _, path in changes})}), flush=True)


def main() -> None:
    """Entry point."""
    folder, marker, debounce, step = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    anyio.run(probe, folder, marker, debounce, step)


if __name__ == "__main__":
    main()
