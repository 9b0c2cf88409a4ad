"""The native protocol as the intake reads it: heartbeats and msgpack results in each job folder."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from fl_orchestrator.core.reasons import Rejection
from fl_orchestrator.intake.adapter import Outcome
from fl_orchestrator.intake.reader import InboundReader, ResultHandle
from fl_orchestrator.intake.safe_read import walk_to_folder
from fl_orchestrator.intake.watcher import MAX_RESULT_SUBFOLDERS
from fl_orchestrator.storage.kept import KeptResults
from fl_orchestrator.wire.layout import APP_NAME, Classified, JobLayout
from fl_orchestrator.wire.parts import part_name, whole_name

# How many parts of one result are looked at for its signature (honest writers use a few).
MAX_PARTS_PROBED = 1024


class NativeWire:
    """The native adapter (intake/adapter.py): files are read where the datasites write them."""

    def __init__(self, layout: JobLayout) -> None:
        self.layout = layout

    @property
    def datasites_dir(self) -> Path:
        """The folder that holds every datasite."""
        return self.layout.datasites_dir

    @property
    def aggregator(self) -> str:
        """The aggregator's email."""
        return self.layout.aggregator

    @property
    def marker(self) -> str:
        """Every file of this job lies below a folder named like this."""
        return os.sep + os.path.join("app_data", APP_NAME, self.layout.job) + os.sep

    def folders_on_the_way(self, datasite: str) -> list[Path]:
        """datasites/<email>, its app_data, the app's folder, the job's folder, its results folder."""
        job = self.layout.app_dir(datasite)
        return [
            job.parent.parent.parent,
            job.parent.parent,
            job.parent,
            job,
            self.layout.results_dir(datasite),
        ]

    def scan(self, datasites: tuple[str, ...]) -> Iterator[Path]:
        """Every heartbeat and result file currently present, for all datasites."""
        return scan_job_files(self.layout, datasites)

    def classify(self, path: Path) -> Classified | None:
        """A heartbeat, a result (maybe badly named) or nothing of ours."""
        return self.layout.classify(path)

    def look_at(self, path: Path) -> Path:
        """A part that arrived names the result it belongs to: that may be complete now."""
        whole = whole_name(path.name)
        if whole is not None and whole.endswith(".result"):
            return path.with_name(whole)
        return path

    def parts_signature(self, path: Path) -> tuple[tuple[str, int, int], ...]:
        """Size and mtime of the parts beside a result (0, 1, ... while they run on): a new part changes it.

        One lstat for a result without parts, whatever else its folder holds: a
        scan of the folder per file made a flood of files quadratic. Parts that
        arrive out of order count once the gap before them is filled.
        """
        found = []
        for index in range(MAX_PARTS_PROBED):
            name = part_name(path.name, index)
            try:
                info = os.lstat(path.with_name(name))
            except OSError:
                break
            found.append((name, info.st_size, info.st_mtime_ns))
        else:
            # Past the probe: the folder's mtime still moves when another part lands.
            with contextlib.suppress(OSError):
                found.append(("", 0, os.lstat(path.parent).st_mtime_ns))
        return tuple(found)

    def read(self, path: Path, classified: Classified, reader: InboundReader) -> Outcome:
        """The file, read and validated where it lies."""
        return reader.read_inbound(path, classified.kind, classified.datasite)

    def keep(self, kept: KeptResults, rnd: int, handle: ResultHandle) -> bool:
        """A hard link to the datasite's file (and its parts), if it is still the inode validated."""
        return kept.keep(rnd, handle.path, handle.identity.inode)

    def decided(self, handle: ResultHandle) -> None:
        """Nothing to do: the datasite's folder is its own."""


def scan_job_files(layout: JobLayout, datasites: tuple[str, ...]) -> Iterator[Path]:
    """Every heartbeat and result file currently present, for all datasites.

    A results folder is listed through a descriptor reached without following
    links (intake/safe_read.py), so a ``results`` that is a link, or lies
    under one, is never listed: the rescan does not read the names in
    another folder the link points to.
    """
    for datasite in datasites:
        heartbeat = layout.heartbeat_path(datasite)
        if os.path.lexists(heartbeat):
            yield heartbeat
        results = layout.results_dir(datasite)
        entries = _listed(layout.datasites_dir, results)
        subfolders: list[str] = []
        for name, is_dir in entries:
            if name.endswith(".result"):
                yield results / name
            if is_dir:
                subfolders.append(name)
        # Nothing belongs in a folder inside results/, but what is put there is refused
        # (bad_name), not left unseen when it landed while the watcher was re-planning.
        for subfolder in sorted(subfolders)[:MAX_RESULT_SUBFOLDERS]:
            folder = results / subfolder
            for name, _ in _listed(layout.datasites_dir, folder):
                if name.endswith(".result"):
                    yield folder / name


def _listed(root: Path, folder: Path) -> list[tuple[str, bool]]:
    """The names in folder (and whether each is a folder itself), none if it cannot be reached safely."""
    try:
        fd = walk_to_folder(root, folder.relative_to(root).parts)
    except (Rejection, ValueError):
        return []
    try:
        return [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in os.scandir(fd)]
    except OSError:
        return []
    finally:
        os.close(fd)
