"""File events for datasite runners, from a watcher known to be running.

A runner announces itself with a heartbeat; the aggregator may answer with a
task within milliseconds. If the watcher were not yet running then, the task
would wait for the next rescan (10 s by default), so the runner waits for
``ready`` first. The watcher counts as running once it has reported a probe
file written into the watched tree; past ``ready_timeout_seconds`` without
that, the runner goes on and says so (the rescan still finds every task).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import anyio
import structlog
from anyio.abc import ObjectSendStream
from watchfiles import Change

from fl_orchestrator.intake.watcher import resilient_awatch, set_when_cancelled
from fl_orchestrator.wire.layout import JOB_ENDED, JobLayout

log = structlog.get_logger("fl_orchestrator.datasite")

PROBE_NAME = ".watch-probe"
_PROBE_EVERY_SECONDS = 0.05


class TaskPaths:
    """Which watched paths matter to the runners of ``datasites``, and what each one means.

    Besides task files, job-ended markers and models, the aggregator's folders
    on the way to them count: a file written into a folder made a moment
    earlier can land before the watcher follows the new folder, and is never
    reported. A folder appearing therefore means "scan again".
    """

    def __init__(self, layout: JobLayout, datasites: Iterable[str]) -> None:
        self.datasites = frozenset(datasites)
        self.tasks_marker = str(layout.aggregator_dir / "tasks") + os.sep
        self.models_marker = str(layout.models_dir) + os.sep
        folders: set[str] = set()
        for target in (layout.aggregator_dir / "tasks", layout.models_dir):
            while target != layout.datasites_dir and target != target.parent:
                folders.add(str(target))
                target = target.parent
        self.folders = frozenset(folders)

    def accept(self, change: Change, path: str) -> bool:
        """The watch filter: tasks, markers, models, folders on the way, the probe."""
        if change == Change.deleted or path.endswith(".tmp"):
            return False
        if path.startswith(self.tasks_marker):
            if self.datasite_of(path) not in self.datasites:
                return False  # another datasite's task: never this runner's to answer
            return path.endswith((".task", os.sep + JOB_ENDED)) or self.is_folder(path)
        return (
            path.startswith(self.models_marker) or path in self.folders or path.endswith(os.sep + PROBE_NAME)
        )

    def is_folder(self, path: str) -> bool:
        """A folder on the way to tasks or models, or one datasite's task folder."""
        if path in self.folders:
            return True
        return path.startswith(self.tasks_marker) and os.sep not in path[len(self.tasks_marker) :]

    def datasite_of(self, path: str) -> str | None:
        """The datasite whose task folder holds (or is) path; None for anything else."""
        if not path.startswith(self.tasks_marker):
            return None
        return path[len(self.tasks_marker) :].split(os.sep, 1)[0]


async def watch_tasks(
    paths: TaskPaths,
    layout: JobLayout,
    probe_dir: Path,
    send: ObjectSendStream[Path],
    ready: anyio.Event,
    *,
    debounce_milliseconds: int,
    ready_timeout_seconds: float = 2.0,
) -> None:
    """Send every accepted path to ``send`` until cancelled; set ``ready`` once events flow."""
    stop = anyio.Event()
    probe = probe_dir / PROBE_NAME
    root = layout.datasites_dir
    root.mkdir(parents=True, exist_ok=True)
    accept = paths.accept
    async with anyio.create_task_group() as group:
        group.start_soon(set_when_cancelled, stop)
        group.start_soon(_probe_until_ready, probe, ready, ready_timeout_seconds)
        async for changes in resilient_awatch(
            root, stop_event=stop, watch_filter=accept, debounce=debounce_milliseconds, step=1
        ):
            for _, name in sorted(changes):
                path = Path(name)
                if path.name == PROBE_NAME:
                    if path == probe and not ready.is_set():
                        ready.set()
                    continue
                await send.send(path)
        group.cancel_scope.cancel()


async def _probe_until_ready(probe: Path, ready: anyio.Event, timeout_seconds: float) -> None:
    probe.parent.mkdir(parents=True, exist_ok=True)
    with anyio.move_on_after(timeout_seconds):
        while not ready.is_set():
            # Rewritten until seen: the watcher may start after the first write.
            probe.write_bytes(b"")
            with anyio.move_on_after(_PROBE_EVERY_SECONDS):
                await ready.wait()
    if not ready.is_set():
        log.warning(
            "datasite.watcher_not_confirmed",
            waited_seconds=timeout_seconds,
            hint="tasks are still found by the rescan; file events may be off on this filesystem",
        )
        ready.set()
    probe.unlink(missing_ok=True)
