"""A second link to every counted result, so a restart can re-read it whatever the datasite does.

(A protocol whose files are not native results, syft-flwr, keeps a native
copy of the validated result instead: ``write``.)

A counted result lives in the datasite's folder, which its owner (or its sync
client) may clean or rewrite at any time. The round log records the result
and the sha256 of its validated bytes; this store keeps the file itself, as a
hard link under ``state_dir/kept/rNNNNN/<its path below datasites/>``. A link
costs no bytes and no copy, and survives the datasite deleting or replacing
its file. It does not survive a rewrite in place (same inode): the sha256
check on re-read catches that, and the result is collected again.

Links need the state folder and the SyftBox folder on one filesystem. Where
they are not, nothing is kept (logged once) and a vanished result is
collected again instead. Rounds are pruned once their checkpoint is durable.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import structlog

from fl_orchestrator.storage import failpoints
from fl_orchestrator.storage.atomic import atomic_write, temp_name_for
from fl_orchestrator.wire.parts import PART_SUFFIX

log = structlog.get_logger("fl_orchestrator.storage")

KEPT_DIR = "kept"


class KeptResults:
    """state_dir/kept/: hard links to the files of counted results, by round."""

    def __init__(self, state_dir: Path, datasites_dir: Path) -> None:
        self.directory = state_dir / KEPT_DIR
        self.datasites_dir = datasites_dir
        self.available = True

    def root(self, rnd: int) -> Path:
        """The folder that mirrors datasites/ for round rnd's kept results."""
        return self.directory / f"r{rnd:05d}"

    def path_for(self, rnd: int, path: Path) -> Path:
        """Where the kept link of a datasite's result file lives."""
        return self.root(rnd) / path.relative_to(self.datasites_dir)

    def keep(self, rnd: int, path: Path, inode: int) -> bool:
        """Link the result file (and its parts) if it is still the validated inode; say if kept.

        Idempotent: a link already in place (a restart folding again) is left as it is.
        """
        if not self.available:
            return False
        target = self.path_for(rnd, path)
        failpoints.check_write(target)
        try:
            if _inode_of(target) == inode:
                return True
            target.parent.mkdir(parents=True, exist_ok=True)
            if not _link(path, target, inode):
                return False  # replaced since it was validated: keep nothing rather than other bytes
            prefix = path.name + PART_SUFFIX
            for entry in os.scandir(path.parent):
                if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
                    _link(Path(entry.path), target.with_name(entry.name), None)
        except FileNotFoundError:
            return _inode_of(target) == inode  # the datasite removed it first: nothing to link
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            self.available = False
            log.warning(
                "result.keep_unavailable",
                path=str(path),
                error=exc.strerror,
                hint="put state_dir on the SyftBox folder's filesystem so counted results"
                " survive their datasite deleting them; until then such a result is collected again",
            )
            return False
        return True

    def write(self, rnd: int, path: Path, frames: list[Any]) -> bool:
        """Keep a counted result as our own file: for a protocol whose files are not native results.

        Atomic and durable: the round log already counts the result, and its
        datasite's file may be deleted right after this returns.
        """
        target = self.path_for(rnd, path)
        failpoints.check_write(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, frames)
        return True

    def prune(self, through_round: int) -> None:
        """Drop the links of rounds up to ``through_round``: their checkpoint holds what they gave."""
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return
        for entry in entries:
            name = entry.name
            if name.startswith("r") and name[1:].isdigit() and int(name[1:]) <= through_round:
                shutil.rmtree(entry.path, ignore_errors=True)


def _inode_of(path: Path) -> int | None:
    try:
        return os.lstat(path).st_ino
    except OSError:
        return None


def _link(source: Path, target: Path, inode: int | None) -> bool:
    """Hard-link source at target (via a temp name, so target is never lost); check the inode."""
    temp = temp_name_for(target)
    os.link(source, temp, follow_symlinks=False)
    if inode is not None and _inode_of(temp) != inode:
        os.unlink(temp)
        return False
    os.replace(temp, target)
    return True
