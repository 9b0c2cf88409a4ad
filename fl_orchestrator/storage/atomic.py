"""Atomic file writes: temp name, fsync, rename, fsync of the directory.

The temp name starts with '.' and ends with '.tmp', which both SyftBox clients
and our own watchers ignore, so a reader sees either nothing or the whole file.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fl_orchestrator.storage import failpoints

# The temp names this module (and the publisher's model writer) gives files:
# '.', the final name, '.', 12 hex digits, '.tmp'. Leftovers of a crash match it.
OWN_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def temp_name_for(path: Path) -> Path:
    """A sibling temp path that no watcher or sync client picks up."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def fsync_dir(directory: Path) -> None:
    """Make a rename in this directory durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, chunks: Iterable[Any], *, fsync: bool, mode: int = 0o644) -> int:
    """Create path (it must not exist), write every chunk, optionally fsync; remove it on failure."""
    written = 0
    failpoints.check_write(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb", buffering=0) as handle:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                while view:
                    count = handle.write(view)
                    if count is None:  # pragma: no cover - only for non-blocking files
                        raise OSError("short write")
                    written += count
                    view = view[count:]
            if fsync:
                os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return written


def write_durably(path: Path, chunks: Iterable[Any]) -> int:
    """Write chunks to a new file at path and fsync it (no rename); return the bytes written.

    For writers that choose the final name only once the content is known.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_new(path, chunks, fsync=True)


def atomic_write(path: Path, chunks: Iterable[Any], *, durable: bool = True, mode: int = 0o644) -> int:
    """Write chunks to path atomically; return the bytes written.

    With durable=False the data and rename are not fsynced: for files that can
    be rewritten identically after a crash (tasks, heartbeats).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_name_for(path)
    written = _write_new(temp, chunks, fsync=durable, mode=mode)
    failpoints.hit("write.before_rename")
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if durable:
        fsync_dir(path.parent)
    failpoints.hit("write.after_rename")
    return written


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> int:
    """Write a text file atomically."""
    return atomic_write(path, [text.encode("utf-8")], durable=durable)


def remove_own_temps(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Delete temp files of our own naming that a crash left in folder; return them.

    Only names that match ``OWN_TEMP_NAME`` are touched, and only regular
    files: anything else in the folder is someone else's.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if recursive:
                removed.extend(remove_own_temps(Path(entry.path), recursive=True))
        elif OWN_TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed
