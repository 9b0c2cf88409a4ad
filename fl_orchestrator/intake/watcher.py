"""File events from the datasites' job folders: watchfiles first, a slow rescan as a net.

The watcher only says "look at this path"; deduplication and decoding happen
downstream, so an event seen twice (by inotify and by the rescan) is harmless.

Only the folders on the way to each datasite's job folder are watched, one
level each, never a whole tree: what a datasite keeps elsewhere in its
folder (an unreadable folder, a link to /etc, a name that is not UTF-8, a
deep tree) cannot slow or break the watch. A folder on the way that is a
link, not a folder or unreadable is not watched, and is reported once
(``watcher.folder_refused``); when a name inside a watched folder breaks the
watcher itself (watchfiles cannot decode a name that is not UTF-8), that
datasite's folders are dropped from the watch for good and the watch goes
on for everyone else (``watcher.datasite_unwatched``). The rescan still
covers every datasite.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import ObjectSendStream
from watchfiles import Change, awatch

from fl_orchestrator.core.reasons import Reason, printable
from fl_orchestrator.intake.adapter import WatchedTree
from fl_orchestrator.wire.layout import TEMP_SUFFIX

log = structlog.get_logger("fl_orchestrator.watcher")

PathBatch = list[Path]
# A safety-net rescan lists this many datasites per worker-thread hop, then lets the loop run.
_RESCAN_DATASITES_PER_HOP = 32
_RESCAN_PAUSE_SECONDS = 0.005
_RESCAN_HINT = "its files are still found by the rescan, every rescan_interval_seconds"
_UNEXPECTED_HINTS = {
    Reason.UNLISTED_FOLDER: "files it writes for this job are refused as unknown_datasite when they appear",
    Reason.SUBFOLDER: "files in it are refused as bad_name",
}
# After a failure the watcher did not attribute to a datasite: wait, then longer each time.
_FIRST_BACKOFF_SECONDS = 0.1
_MAX_BACKOFF_SECONDS = 10.0
# How long a new watch may run before it first yields (and its new folders are listed).
_FIRST_LOOK_MILLISECONDS = 500
_QUOTED_PATH = re.compile(r'"([^"]+)"')


# Bounds on what is watched beyond the job's own folders: folders of parties that are not
# in the job (their files are refused as unknown_datasite), and folders inside results/
# (their files are refused as bad_name).
MAX_UNLISTED_FOLDERS = 256
MAX_RESULT_SUBFOLDERS = 16


@dataclass(frozen=True)
class WatchPlan:
    """The folders to watch (one level each) and every folder whose coming or going changes the plan."""

    folders: tuple[Path, ...]
    on_the_way: frozenset[str]
    results_dirs: frozenset[str]
    members: frozenset[str]
    refused: dict[str, tuple[Reason, str]]
    unlisted_skipped: int = 0
    # Folders where none belongs: a party not in the job, a folder inside results/.
    unexpected: tuple[tuple[str, Reason, str], ...] = ()


def plan_watch(tree: WatchedTree, datasites: tuple[str, ...], dropped: set[str]) -> WatchPlan:
    """Which folders to watch now: each existing, real, readable folder on the way, per party."""
    unlisted = _unlisted_folders(tree.datasites_dir, {*datasites, tree.aggregator})
    members = [d for d in (*datasites, *unlisted[:MAX_UNLISTED_FOLDERS]) if d not in dropped]
    folders = [tree.datasites_dir]
    on_the_way: set[str] = set()
    results_dirs: set[str] = set()
    refused: dict[str, tuple[Reason, str]] = {}
    unexpected = [
        (name, Reason.UNLISTED_FOLDER, f"{tree.datasites_dir / name}: not a datasite of this job")
        for name in unlisted[:MAX_UNLISTED_FOLDERS]
    ]
    for member in members:
        chain = tree.folders_on_the_way(member)
        on_the_way.update(str(folder) for folder in chain)
        results_dirs.add(str(chain[-1]))
        for folder in chain:
            if not os.path.lexists(folder):
                break  # the folder above is watched: its appearance changes the plan
            problem = _unwatchable(folder)
            if problem is not None:
                refused[member] = problem
                break
            folders.append(folder)
        else:
            for sub in _subfolders(chain[-1])[:MAX_RESULT_SUBFOLDERS]:
                unexpected.append(
                    (member, Reason.SUBFOLDER, f"{sub}: results are files directly in results/")
                )
                on_the_way.add(str(sub))
                if _unwatchable(sub) is None:
                    folders.append(sub)
    return WatchPlan(
        tuple(folders),
        frozenset(on_the_way),
        frozenset(results_dirs),
        frozenset(members),
        refused,
        max(0, len(unlisted) - MAX_UNLISTED_FOLDERS),
        tuple(unexpected),
    )


def _unwatchable(folder: Path) -> tuple[Reason, str] | None:
    """Why an existing folder cannot be watched, or None."""
    try:
        info = os.lstat(folder)
    except OSError as exc:
        return Reason.UNREADABLE, f"{folder}: {exc.strerror}"
    if stat.S_ISLNK(info.st_mode):
        return Reason.SYMLINK, f"{folder} is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return Reason.NOT_REGULAR_FILE, f"{folder} is not a folder"
    if not os.access(folder, os.R_OK | os.X_OK):
        return Reason.UNREADABLE, f"{folder} cannot be read"
    return None


def _unlisted_folders(datasites_dir: Path, listed: set[str]) -> list[str]:
    """Folders under datasites/ of parties that are not in the job, sorted."""
    try:
        names = [e.name for e in os.scandir(datasites_dir) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    return sorted(name for name in names if name not in listed and name.isprintable())


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False))
    except OSError:
        return []


def _entries_of(folders: list[Path], on_the_way: frozenset[str]) -> PathBatch:
    """What lies in these folders now, but the folders on the way themselves."""
    found: PathBatch = []
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        found.extend(Path(entry.path) for entry in entries if entry.path not in on_the_way)
    return sorted(found)


def _job_filter(tree: WatchedTree, plan: WatchPlan) -> Callable[[Change, str], bool]:
    marker = tree.marker
    datasites_dir = str(tree.datasites_dir)

    def accept(change: Change, path: str) -> bool:
        if path in plan.on_the_way or os.path.dirname(path) == datasites_dir:
            return True  # a folder on the way, or a party's folder, came or went: plan again
        return change != Change.deleted and marker in path and not path.endswith(TEMP_SUFFIX)

    return accept


def _changes_plan(plan: WatchPlan, path: str, datasites_dir: str) -> bool:
    """True if this path's coming or going means other folders must be watched."""
    if path in plan.on_the_way:
        return True
    parent = os.path.dirname(path)
    if parent == datasites_dir:
        return os.path.basename(path) not in plan.members
    return parent in plan.results_dirs and os.path.isdir(path) and not os.path.islink(path)


async def watch_job_files(
    tree: WatchedTree,
    datasites: tuple[str, ...],
    send: ObjectSendStream[PathBatch],
    *,
    debounce_milliseconds: int,
    rescan_interval_seconds: float,
) -> None:
    """Send batches of paths to look at: a full scan now, then events, then rescans."""
    tree.datasites_dir.mkdir(parents=True, exist_ok=True)
    stop = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(set_when_cancelled, stop)
        group.start_soon(_rescan_forever, tree, datasites, send, rescan_interval_seconds)
        await JobWatch(tree, datasites, debounce_milliseconds).run(send, stop)
        group.cancel_scope.cancel()


class JobWatch:
    """The watch over the folders on the way to every datasite's job folder; see the module docstring."""

    def __init__(self, tree: WatchedTree, datasites: tuple[str, ...], debounce_milliseconds: int) -> None:
        self.tree = tree
        self.datasites = datasites
        self.debounce = debounce_milliseconds
        self.step = max(1, min(debounce_milliseconds, math.ceil(debounce_milliseconds / 4)))
        self.dropped: set[str] = set()
        self.reported: set[tuple[str, str]] = set()
        self.restarts = 0
        # The folders of the last watch that got going: a folder not among them is new.
        self.watching: frozenset[Path] = frozenset()

    async def run(self, send: ObjectSendStream[PathBatch], stop: anyio.Event) -> None:
        """Watch until ``stop`` is set, planning again whenever a folder on the way changes."""
        backoff = _FIRST_BACKOFF_SECONDS
        while not stop.is_set():
            plan = await anyio.to_thread.run_sync(plan_watch, self.tree, self.datasites, self.dropped)
            for refused, (reason, detail) in plan.refused.items():
                self._report("watcher.folder_refused", refused, reason, detail, _RESCAN_HINT)
            for party, reason, detail in plan.unexpected:
                self._report("watcher.folder_unexpected", party, reason, detail, _UNEXPECTED_HINTS[reason])
            if plan.unlisted_skipped:
                detail = f"{plan.unlisted_skipped} folders of parties not in the job beyond the first"
                self._report(
                    "watcher.folder_ignored",
                    "_unknown",
                    Reason.UNKNOWN_DATASITE,
                    f"{detail} {MAX_UNLISTED_FOLDERS}",
                    "files in those folders are not looked at",
                )
            try:
                await self._watch(plan, send, stop)
                backoff = _FIRST_BACKOFF_SECONDS
            except* (RuntimeError, OSError) as group:
                error = group.exceptions[0]
                datasite = self._datasite_of(str(error))
                self.restarts += 1
                if datasite is not None and isinstance(error, RuntimeError):
                    self.dropped.add(datasite)
                    self._report(
                        "watcher.datasite_unwatched", datasite, Reason.BAD_NAME, str(error), _RESCAN_HINT
                    )
                elif datasite is None:
                    log.warning(
                        "watcher.restarted", error=printable(repr(error), 300), retry_in_seconds=backoff
                    )
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)

    async def _watch(self, plan: WatchPlan, send: ObjectSendStream[PathBatch], stop: anyio.Event) -> None:
        """One watch over ``plan``; returns when the plan must change, or on ``stop``."""
        changes_of = awatch(
            *plan.folders,
            stop_event=stop,
            watch_filter=_job_filter(self.tree, plan),
            debounce=self.debounce,
            step=self.step,
            recursive=False,
            ignore_permission_denied=True,
            # The first yield, even an empty one, says the watch is set up: see below.
            rust_timeout=_FIRST_LOOK_MILLISECONDS,
            yield_on_timeout=True,
        )
        datasites_dir = str(self.tree.datasites_dir)
        top = self.tree.datasites_dir  # holds the parties' folders: nothing to read there
        fresh = [folder for folder in plan.folders if folder not in self.watching and folder != top]
        first, replan = True, False
        async with aclosing(changes_of) as batches:
            async for changes in batches:
                paths = {path for _, path in changes}
                files = sorted(Path(p) for p in paths if p not in plan.on_the_way)
                if first:
                    first = False
                    # What came while this watch was being set up has no event: a file in a
                    # new folder is listed now, and a new folder on the way means planning again.
                    files += await anyio.to_thread.run_sync(_entries_of, fresh, plan.on_the_way)
                    self.watching = frozenset(plan.folders)
                    again = await anyio.to_thread.run_sync(
                        plan_watch, self.tree, self.datasites, self.dropped
                    )
                    replan = again.folders != plan.folders
                if files:
                    await send.send(files)
                if replan or any(_changes_plan(plan, p, datasites_dir) for p in paths):
                    return

    def _datasite_of(self, message: str) -> str | None:
        """The datasite whose folder a watcher error names, if any."""
        prefix = str(self.tree.datasites_dir) + os.sep
        for quoted in _QUOTED_PATH.findall(message):
            if isinstance(quoted, str) and quoted.startswith(prefix):
                email = str(quoted[len(prefix) :].split(os.sep, 1)[0])
                if email in self.datasites:
                    return email
        return None

    def _report(self, event: str, datasite: str, reason: Reason, detail: str, hint: str) -> None:
        if (datasite, str(reason)) in self.reported:
            return
        self.reported.add((datasite, str(reason)))
        log.warning(
            event,
            datasite=datasite,
            reason=str(reason),
            detail=printable(detail, 300),
            hint=hint,
        )


async def resilient_awatch(
    root: Path, *, stop_event: anyio.Event, **options: Any
) -> AsyncIterator[set[tuple[Change, str]]]:
    """``awatch`` over root, recursive, restarted (with backoff) when the watcher itself fails.

    watchfiles raises a RuntimeError (inside an exception group) when it meets
    a path it cannot decode as UTF-8. Restarting loses the events of that
    moment only; the periodic rescan finds whatever they were about.
    """
    backoff = _FIRST_BACKOFF_SECONDS
    while not stop_event.is_set():
        try:
            async for changes in awatch(
                root, stop_event=stop_event, recursive=True, ignore_permission_denied=True, **options
            ):
                backoff = _FIRST_BACKOFF_SECONDS
                yield changes
            return
        except* RuntimeError as errors:
            log.warning(
                "watcher.restarted",
                root=str(root),
                error=repr(errors.exceptions[0])[:300],
                retry_in_seconds=backoff,
            )
        await anyio.sleep(backoff)
        backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)


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
    tree: WatchedTree, datasites: tuple[str, ...], send: ObjectSendStream[PathBatch], interval: float
) -> None:
    # The first scan picks up whatever landed while the daemon was not running: in one go.
    batch = await anyio.to_thread.run_sync(_listed_files, tree, datasites)
    if batch:
        await send.send(batch)
    while True:
        await anyio.sleep(interval)
        batch = await _rescan_paced(tree, datasites)
        if batch:
            await send.send(batch)


async def _rescan_paced(tree: WatchedTree, datasites: tuple[str, ...]) -> PathBatch:
    """Every job file, listed a few datasites per worker-thread hop with a short pause between.

    Listing folders safely is Python work that holds the interpreter lock. In one
    hop over 1,000 datasites it held it for 130-190 ms, and results landing
    meanwhile waited for the event loop (detection p99, bench/README.md).
    """
    batch: PathBatch = []
    for start in range(0, len(datasites), _RESCAN_DATASITES_PER_HOP):
        chunk = datasites[start : start + _RESCAN_DATASITES_PER_HOP]
        batch += await anyio.to_thread.run_sync(_listed_files, tree, chunk)
        await anyio.sleep(_RESCAN_PAUSE_SECONDS)
    return batch


def _listed_files(tree: WatchedTree, datasites: tuple[str, ...]) -> PathBatch:
    return list(tree.scan(datasites))
