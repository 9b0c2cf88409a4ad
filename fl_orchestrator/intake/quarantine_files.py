"""Keeping a refused file: moved, copied, or only recorded, never through a link.

The rules are in intake/quarantine.py's docstring; this module does the file
work: walking to the file's folder without following links, renaming or
copying it into the quarantine, and measuring what the quarantine holds.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fl_orchestrator.core.reasons import printable

COPY_MAX_BYTES = 64 * 1024 * 1024
RECORDS = "records.jsonl"
OLDER_RECORDS = "records.1.jsonl"
# Records of versions before records.jsonl, one file per refusal: not kept files.
_OLD_RECORD_SUFFIX = ".reason.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+=-]")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _NotMoved(Exception):
    """Why a refused file stays where it is (recorded only)."""


@dataclass(frozen=True)
class Moved:
    """What became of a refused file: where it went, what it was, why it stayed."""

    to: Path | None
    what: str
    error: str | None
    link_target: str | None = None
    size: int | None = None


def move_aside(
    path: Path,
    folder: Path,
    stem: str,
    root: Path,
    *,
    record_only: bool,
    copying: bool,
    reserve: Callable[[int], str | None],
) -> Moved:
    """Move (or, ``copying``, copy) a refused file into folder as stem; say what was done.

    ``reserve`` takes the disk the file would take and says why it may not
    (None: it may).
    """
    try:
        parent_fd = _open_parent(root, path)
    except _NotMoved as exc:
        return Moved(None, "unknown", str(exc))
    try:
        name = path.name
        try:
            info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return Moved(None, "gone", "the file was gone before it could be moved")
        what = what_kind(info.st_mode)
        link_target = None
        if stat.S_ISLNK(info.st_mode):
            # readlink only reads the link's text; nothing is followed.
            link_target = printable(os.fsdecode(os.readlink(name, dir_fd=parent_fd)), 1024)
        done = Moved(None, what, None, link_target, info.st_size if what == "file" else None)
        if record_only:
            return dataclasses.replace(done, error="not a datasite of this job: its folder is left alone")
        if stat.S_ISDIR(info.st_mode):
            return dataclasses.replace(done, error="a directory is recorded, not moved")
        refused = reserve(disk_cost(info, copying=copying))
        if refused is not None:
            return dataclasses.replace(done, error=refused)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / stem
        while os.path.lexists(target):
            target = folder / f"{stem}-{secrets.token_hex(2)}"
        if copying:
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


def disk_cost(info: os.stat_result, *, copying: bool) -> int:
    """What keeping a file takes: a copy writes every byte (a sparse file too); a move, its blocks."""
    if copying:
        return min(info.st_size, COPY_MAX_BYTES)
    return info.st_blocks * 512


def usage_on_disk(directory: Path) -> dict[str, int]:
    """Bytes the kept files under quarantine/<bucket>/ take now (the records are not counted)."""
    used: dict[str, int] = {}
    try:
        buckets = [entry for entry in os.scandir(directory) if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return used
    for bucket in buckets:
        total = 0
        for entry in os.scandir(bucket.path):
            kept = entry.name not in (RECORDS, OLDER_RECORDS) and not entry.name.endswith(_OLD_RECORD_SUFFIX)
            if kept and entry.is_file(follow_symlinks=False):
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
        dst = os.open(target, _NEW_FILE_FLAGS, 0o600)
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


def what_kind(mode: int) -> str:
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


def safe_name(name: str, limit: int) -> str:
    """A file-name component made of safe characters (the record keeps the real name)."""
    safe = _UNSAFE.sub("_", name)[:limit]
    return "_" if safe in ("", ".", "..") else safe
