"""Atomic file writes: temp name, fsync, rename, fsync of the directory.

The temp name starts with '.' and ends with '.tmp', which both SyftBox clients
and our own watchers ignore, so a reader sees either nothing or the whole file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any


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


def atomic_write(path: Path, chunks: Iterable[Any], *, durable: bool = True, mode: int = 0o644) -> int:
    """Write chunks to path atomically; return the bytes written.

    With durable=False the data and rename are not fsynced: for files that can
    be rewritten identically after a crash (tasks, heartbeats).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_name_for(path)
    written = 0
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
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
            if durable:
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if durable:
        fsync_dir(path.parent)
    return written


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> int:
    """Write a text file atomically."""
    return atomic_write(path, [text.encode("utf-8")], durable=durable)
