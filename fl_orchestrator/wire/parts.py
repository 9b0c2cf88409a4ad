"""Large files as parts: what a sync with a file-size cap can carry.

SyftBox 0.4.0 refuses files over 10 MB, and the current client syncs small
files first. A model or result larger than ``part_bytes`` is written as
``<name>.part-0000``, ``<name>.part-0001``, ... (each written once, never
overwritten) whose concatenation is exactly the message file it stands for.

- A model's task names it with ``parts = n`` beside its path, size and sha256.
- A result's ``<task id>.result`` is then a small ``parts`` message, written
  after every part, giving the count, the total size and the sha256 of the
  concatenation.

A reader that finds a part missing, short or not matching the sha256 yet
treats the file as still arriving, never as final.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from fl_orchestrator.core.reasons import Reason, Rejection

PART_SUFFIX = ".part-"
MAX_PARTS = 100_000
# Every part but the last holds at least this much: a manifest claiming more parts than
# its bytes allow is refused before any part is looked at.
MIN_PART_BYTES = 64


def part_name(name: str, index: int) -> str:
    """The file name of one part."""
    return f"{name}{PART_SUFFIX}{index:04d}"


def whole_name(part: str) -> str | None:
    """The name a part file belongs to, or None if it is not a part name."""
    base, sep, index = part.rpartition(PART_SUFFIX)
    if not sep or not base or not index.isdigit():
        return None
    return base


def split_frames(frames: Sequence[Any], part_bytes: int) -> list[list[memoryview]]:
    """Cut an encoded message into parts of at most part_bytes, without copying."""
    parts: list[list[memoryview]] = [[]]
    room = part_bytes
    for frame in frames:
        view = memoryview(frame).cast("B")
        while view.nbytes:
            if room == 0:
                parts.append([])
                room = part_bytes
            take = min(room, view.nbytes)
            parts[-1].append(view[:take])
            view = view[take:]
            room -= take
    return parts


def assemble(chunks: Sequence[bytes | bytearray | memoryview], nbytes: int, sha256: str) -> memoryview:
    """Join parts into one buffer, checking size and hash; Rejection(TRUNCATED) if not there yet."""
    total = sum(memoryview(c).nbytes for c in chunks)
    if total != nbytes:
        raise Rejection(Reason.TRUNCATED, f"the parts hold {total} of {nbytes} bytes")
    buffer = bytearray(nbytes)
    digest = hashlib.sha256()
    offset = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        buffer[offset : offset + view.nbytes] = view
        digest.update(view)
        offset += view.nbytes
    if digest.hexdigest() != sha256:
        raise Rejection(Reason.TRUNCATED, "the parts do not match their sha256 (yet)")
    return memoryview(buffer)
