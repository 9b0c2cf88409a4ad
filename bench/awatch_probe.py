"""Baseline of the detection-latency benchmark: a bare watchfiles ``awatch`` on one or more folders.

Watches recursively with the daemon's debounce, step and filter (this job's
folders, no deletions, no ``*.tmp``), and prints one JSON line per batch:
``{"t": <time.time() on receipt>, "paths": [...]}``. Stopped by SIGTERM.

Usage: awatch_probe.py MARKER DEBOUNCE_MS STEP_MS FOLDER [FOLDER ...]
"""

from __future__ import annotations

import json
import sys
import time

import anyio
from watchfiles import Change, awatch


async def probe(folders: list[str], marker: str, debounce: int, step: int) -> None:
    """Print every batch of changes under the folders as it arrives."""

    def accept(change: Change, path: str) -> bool:
        return change != Change.deleted and marker in path and not path.endswith(".tmp")

    async for changes in awatch(
        *folders,
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
    marker, debounce, step, folders = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    anyio.run(probe, folders, marker, debounce, step)


if __name__ == "__main__":
    main()
