"""File events from the datasites' job folders: watchfiles first, a slow rescan as a net.

The watcher only says "look at this path"; deduplication and decoding happen
downstream, so an event seen twice (by inotify and by the rescan) is harmless.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import ObjectSendStream
from watchfiles import Change, awatch

from fl_orchestrator.wire.layout import JobLayout

log = structlog.get_logger("fl_orchestrator.watcher")

PathBatch = list[Path]


def scan_job_files(layout: JobLayout, datasites: tuple[str, ...]) -> Iterator[Path]:
    """Every heartbeat and result file currently present, for all datasites."""
    for datasite in datasites:
        heartbeat = layout.heartbeat_path(datasite)
        if os.path.lexists(heartbeat):
            yield heartbeat
        results = layout.results_dir(datasite)
        try:
            entries = list(os.scandir(results))
        except OSError:
            continue
        for entry in entries:
            if entry.name.endswith(".result"):
                yield Path(entry.path)


def _job_filter(layout: JobLayout) -> Callable[[Change, str], bool]:
    marker = os.sep + os.path.join("app_data", "fl_orchestrator", layout.job) + os.sep

    def accept(change: Change, path: str) -> bool:
        return change != Change.deleted and marker in path and not path.endswith(".tmp")

    return accept


async def watch_job_files(
    layout: JobLayout,
    datasites: tuple[str, ...],
    send: ObjectSendStream[PathBatch],
    *,
    debounce_milliseconds: int,
    rescan_interval_seconds: float,
) -> None:
    """Send batches of paths to look at: a full scan now, then events, then rescans."""
    layout.datasites_dir.mkdir(parents=True, exist_ok=True)
    stop = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(set_when_cancelled, stop)
        group.start_soon(_rescan_forever, layout, datasites, send, rescan_interval_seconds)
        step = max(1, min(debounce_milliseconds, math.ceil(debounce_milliseconds / 4)))
        async for changes in resilient_awatch(
            layout.datasites_dir,
            stop_event=stop,
            watch_filter=_job_filter(layout),
            debounce=debounce_milliseconds,
            step=step,
        ):
            await send.send(sorted({Path(path) for _, path in changes}))
        group.cancel_scope.cancel()


async def resilient_awatch(
    root: Path, *, stop_event: anyio.Event, **options: Any
) -> AsyncIterator[set[tuple[Change, str]]]:
    """``awatch`` over root, recursive, restarted when the watcher itself fails.

    watchfiles raises a RuntimeError (inside an exception group) when it meets
    a path it cannot decode as UTF-8, and any datasite can sync such a name
    into the tree. Restarting loses the events of that moment only; the
    periodic rescan finds whatever they were about.
    """
    while not stop_event.is_set():
        try:
            async for changes in awatch(
                root, stop_event=stop_event, recursive=True, ignore_permission_denied=True, **options
            ):
                yield changes
            return
        except* RuntimeError as errors:
            log.warning("watcher.restarted", root=str(root), error=repr(errors.exceptions[0])[:300])
        await anyio.sleep(0.1)


async def set_when_cancelled(stop: anyio.Event) -> None:
    """Set ``stop`` when the enclosing scope is cancelled.

    The file-watching thread cannot be cancelled; it checks its stop event
    between steps, so this turns a cancellation into a prompt return instead
    of a wait for the watcher's own timeout.
    """
    try:
        await anyio.sleep_forever()
    finally:
        stop.set()


async def _rescan_forever(
    layout: JobLayout, datasites: tuple[str, ...], send: ObjectSendStream[PathBatch], interval: float
) -> None:
    # The first scan picks up whatever landed while the daemon was not running.
    while True:
        batch = await anyio.to_thread.run_sync(lambda: list(scan_job_files(layout, datasites)))
        if batch:
            await send.send(batch)
        await anyio.sleep(interval)
