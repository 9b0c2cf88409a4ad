"""Quarantine: refused files are moved out of the way, with their reason beside them.

Every refusal is one ``file.rejected`` log event, one ``.reason.json`` record
under ``<state_dir>/quarantine/<datasite>/`` and one count per datasite and
reason. The file itself is moved next to its record when that is safe:

- the move is a rename relative to the file's folder, opened without
  following links from the datasites root down, so a symlink is moved as
  the link itself and no link on the path can redirect the move elsewhere;
- a directory, a file under a symlinked folder, and anything in the folder
  of a datasite that is not in the job are only recorded: moving a tree or
  writing into a stranger's folder is not ours to do;
- across filesystems a regular file of at most 64 MiB is copied (through a
  descriptor opened without following links) and then unlinked; anything
  bigger is recorded, so a 2 GiB bomb never fills the state folder.

A datasite whose files are refused ``flag_after`` times in a row, with no
counted result in between, is flagged (``datasite.flagged``) until the
daemon calls ``counted`` for it again.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from fl_orchestrator.core.reasons import Reason, printable
from fl_orchestrator.storage.atomic import atomic_write_text
from fl_orchestrator.storage.jsonl import json_text
from fl_orchestrator.storage.retry import StateWriteError, WriteRetry

log = structlog.get_logger("fl_orchestrator.quarantine")

# Refusals of files from folders that are not datasites of the job are counted
# and recorded under this one name: there is no '@' in it, so no datasite has
# it, and a flood of made-up folders cannot grow status.json without bound.
UNKNOWN_DATASITES = "_unknown"
COPY_MAX_BYTES = 64 * 1024 * 1024
_TIMING_REASONS = frozenset({Reason.ROUND_CLOSED, Reason.UNKNOWN_ROUND})
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+=-]")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


class _NotMoved(Exception):
    """Why a refused file stays where it is (recorded only)."""


@dataclass(frozen=True)
class _Moved:
    to: Path | None
    what: str
    error: str | None
    link_target: str | None = None
    size: int | None = None


@dataclass
class Quarantine:
    """state_dir/quarantine/<datasite>/<stamp>-<token>-<reason>-<name> plus a .reason.json."""

    directory: Path
    flag_after: int = 5
    # Under real sync a refused file lives in another party's datasite: moving
    # it makes our client try to delete it upstream (refused), then fetch it
    # again. With keep_originals the file is copied and left where it is.
    keep_originals: bool = False
    # Record writes are retried like every state write; None: one try (tools, tests).
    retry: WriteRetry | None = None
    # Disk the kept files may take, in equal shares of ``shares`` (datasites + strangers).
    max_bytes: int = 256 * 1024 * 1024
    shares: int = 1
    used: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    _usage_loaded: bool = field(default=False, repr=False, compare=False)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    streaks: dict[str, int] = field(default_factory=dict)
    flagged: set[str] = field(default_factory=set)
    # refuse() runs in worker threads (intake and round loop may overlap) while
    # status.json is written from another: counters change under this lock.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def refuse(
        self,
        path: Path,
        datasite: str,
        reason: Reason,
        detail: str,
        *,
        root: Path | None = None,
        **context: object,
    ) -> Path | None:
        """Log, count, record and (if safe) move one refused file; return where it went.

        ``root`` is the datasites folder: links are not followed below it.
        Without it no link is followed anywhere on the path. Raises nothing
        but StateWriteError, when the record could not be written for
        ``write_retry_seconds``.
        """
        unknown = reason == Reason.UNKNOWN_DATASITE
        bucket = UNKNOWN_DATASITES if unknown else datasite
        # Lateness is not misbehaviour: a slow datasite's late answers do not flag it.
        track = not unknown and reason not in _TIMING_REASONS
        newly_flagged, streak = self._count(bucket, reason, track=track)
        folder = self.directory / _safe(bucket, 128)
        stem = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}-{reason}"
        stem = f"{stem}-{_safe(path.name, 80)}"
        try:
            moved = self._move(path, folder, stem, root or Path(path.anchor or "/"), record_only=unknown)
        except Exception as exc:  # never let bookkeeping of a refusal stop the daemon
            moved = _Moved(None, "unknown", f"{type(exc).__name__}: {exc}")
        record = {
            "source": printable(str(path), 4096),
            "datasite": printable(datasite, 256),
            "reason": str(reason),
            "detail": detail,
            "what": moved.what,
            "size": moved.size,
            "link_target": moved.link_target,
            "moved_to": str(moved.to) if moved.to else None,
            "move_error": moved.error,
            "at": time.time(),
        }
        record_path = folder / f"{stem}.reason.json"
        record_error = None
        text = json_text(record, sort_keys=True)
        try:
            if self.retry is None:
                atomic_write_text(record_path, text, durable=False)
            else:
                self.retry.run_blocking(
                    lambda: atomic_write_text(record_path, text, durable=False),
                    what="quarantine record",
                    path=record_path,
                )
        except StateWriteError:
            raise  # the disk stayed unwritable: the daemon exits 74, as for any state write
        except Exception as exc:
            record_error = f"record not written: {type(exc).__name__}: {exc}"
        log.warning(
            "file.rejected",
            datasite=printable(datasite, 256),
            reason=str(reason),
            detail=detail,
            path=printable(str(path), 4096),
            what=moved.what,
            quarantined_to=str(moved.to) if moved.to else None,
            record=None if record_error else str(record_path),
            move_error=moved.error,
            record_error=record_error,
            consecutive_rejections=streak,
            **context,
        )
        if newly_flagged:
            log.warning(
                "datasite.flagged",
                datasite=datasite,
                consecutive_rejections=streak,
                last_reason=str(reason),
                hint="its files keep being refused; see quarantine/ and the file.rejected events",
                **context,
            )
        return moved.to

    def counted(self, datasite: str) -> None:
        """A result of ``datasite`` was counted by the round: its streak of refusals ends."""
        with self._lock:
            self.streaks.pop(datasite, None)
            was_flagged = datasite in self.flagged
            self.flagged.discard(datasite)
        if was_flagged:
            log.info("datasite.unflagged", datasite=datasite)

    @property
    def share_bytes(self) -> int:
        """What one datasite's refused files may take."""
        return self.max_bytes // max(self.shares, 1)

    def _reserve(self, bucket: str, cost: int) -> bool:
        """Count ``cost`` bytes against a bucket's share; False (and a drop counted) if over it."""
        with self._lock:
            if not self._usage_loaded:
                self.used = _usage_on_disk(self.directory)
                self._usage_loaded = True
            if self.used.get(bucket, 0) + cost > self.share_bytes:
                self.dropped[bucket] = self.dropped.get(bucket, 0) + 1
                return False
            self.used[bucket] = self.used.get(bucket, 0) + cost
            return True

    def snapshot_dropped(self) -> dict[str, int]:
        """Refused files not kept because their datasite's share was used up, per bucket."""
        with self._lock:
            return dict(self.dropped)

    def snapshot_counts(self) -> dict[str, dict[str, int]]:
        """A copy of the per-datasite, per-reason counts, safe to serialise in another thread."""
        with self._lock:
            return {site: dict(reasons) for site, reasons in self.counts.items()}

    def flagged_datasites(self) -> list[str]:
        """The flagged datasites, sorted (for status.json)."""
        with self._lock:
            return sorted(self.flagged)

    def _count(self, bucket: str, reason: Reason, *, track: bool) -> tuple[bool, int]:
        with self._lock:
            per_site = self.counts.setdefault(bucket, {})
            per_site[str(reason)] = per_site.get(str(reason), 0) + 1
            if not track:
                return False, 0
            streak = self.streaks.get(bucket, 0) + 1
            self.streaks[bucket] = streak
            if streak >= self.flag_after and bucket not in self.flagged:
                self.flagged.add(bucket)
                return True, streak
            return False, streak

    def _move(self, path: Path, folder: Path, stem: str, root: Path, *, record_only: bool) -> _Moved:
        try:
            parent_fd = _open_parent(root, path)
        except _NotMoved as exc:
            return _Moved(None, "unknown", str(exc))
        try:
            name = path.name
            try:
                info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                return _Moved(None, "gone", "the file was gone before it could be moved")
            what = _what(info.st_mode)
            link_target = None
            if stat.S_ISLNK(info.st_mode):
                # readlink only reads the link's text; nothing is followed.
                link_target = printable(os.fsdecode(os.readlink(name, dir_fd=parent_fd)), 1024)
            done = _Moved(None, what, None, link_target, info.st_size if what == "file" else None)
            if record_only:
                return dataclasses.replace(done, error="not a datasite of this job: its folder is left alone")
            if stat.S_ISDIR(info.st_mode):
                return dataclasses.replace(done, error="a directory is recorded, not moved")
            if not self._reserve(folder.name, _disk_cost(info, copying=self.keep_originals)):
                return dataclasses.replace(
                    done,
                    error=f"this datasite's share of quarantine_max_bytes ({self.share_bytes} bytes) is"
                    " used up: recorded, not kept",
                )
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / stem
            while os.path.lexists(target):
                target = folder / f"{stem}-{secrets.token_hex(2)}"
            if self.keep_originals:
                error = _copy_file(parent_fd, name, info, target)
                return dataclasses.replace(done, to=None if error else target, error=error)
            try:
                os.rename(name, target, src_dir_fd=parent_fd)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    return dataclasses.replace(done, error=f"not moved: {exc.strerror}")
                error = _copy_across(parent_fd, name, info, target)
                return dataclasses.replace(done, to=None if error else target, error=error)
            return dataclasses.replace(done, to=target)
        finally:
            os.close(parent_fd)


def _disk_cost(info: os.stat_result, *, copying: bool) -> int:
    """What keeping a file takes: a copy writes every byte (a sparse file too); a move, its blocks."""
    if copying:
        return min(info.st_size, COPY_MAX_BYTES)
    return info.st_blocks * 512


def _usage_on_disk(directory: Path) -> dict[str, int]:
    """Bytes the kept files under quarantine/<bucket>/ take now (the records are not counted)."""
    used: dict[str, int] = {}
    try:
        buckets = [entry for entry in os.scandir(directory) if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return used
    for bucket in buckets:
        total = 0
        for entry in os.scandir(bucket.path):
            if not entry.name.endswith(".reason.json") and entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_blocks * 512
        used[bucket.name] = total
    return used


def _copy_across(parent_fd: int, name: str, info: os.stat_result, target: Path) -> str | None:
    """Move a regular file to another filesystem: copy it, then unlink it; return why not."""
    error = _copy_file(parent_fd, name, info, target, why="on another filesystem")
    if error is None:
        os.unlink(name, dir_fd=parent_fd)
    return error


def _copy_file(
    parent_fd: int, name: str, info: os.stat_result, target: Path, *, why: str = "the original stays"
) -> str | None:
    """Copy a regular file of at most COPY_MAX_BYTES to target; return why not."""
    if not stat.S_ISREG(info.st_mode):
        return f"{why}, and not a regular file: recorded, not copied"
    if info.st_size > COPY_MAX_BYTES:
        return f"{why} and over {COPY_MAX_BYTES} bytes: recorded, not copied"
    src = os.open(name, _FILE_FLAGS, dir_fd=parent_fd)
    try:
        opened = os.fstat(src)
        if not stat.S_ISREG(opened.st_mode) or opened.st_size > COPY_MAX_BYTES:
            return "changed while being moved: recorded, not moved"
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            copied = 0
            while copied <= COPY_MAX_BYTES:
                chunk = os.read(src, 1 << 20)
                if not chunk:
                    break
                os.write(dst, chunk)
                copied += len(chunk)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return None


def _open_parent(root: Path, path: Path) -> int:
    """Open path's folder, walking from root with O_NOFOLLOW; raise _NotMoved if unsafe."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise _NotMoved("outside the datasites folder: recorded, not moved") from None
    if not parts or any(part in ("", ".", "..") for part in parts):
        raise _NotMoved("the path has an empty, '.' or '..' part: recorded, not moved")
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _NotMoved(f"cannot open {root}: {exc.strerror}") from None
    for part in parts[:-1]:
        try:
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                why = "a folder on the path is a symbolic link or not a folder: recorded, not moved"
                raise _NotMoved(why) from None
            raise _NotMoved(f"cannot open a folder on the path: {exc.strerror}") from None
        os.close(fd)
        fd = next_fd
    return fd


def _what(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "device"),
        (stat.S_ISBLK, "device"),
    ):
        if test(mode):
            return name
    return "unknown"


def _safe(name: str, limit: int) -> str:
    """A file-name component made of safe characters (the record keeps the real name)."""
    safe = _UNSAFE.sub("_", name)[:limit]
    return "_" if safe in ("", ".", "..") else safe
