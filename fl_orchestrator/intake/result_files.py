"""Counted results read back from their files, a block at a time, for whole-set strategies.

A whole-set strategy (median, trimmed mean, Krum, Bulyan) needs every result
of the round at once. Holding them decoded would cost N models of memory, and
even memory-mapping them leaves every page read counted in the daemon's RSS
until the round ends. Here each block is read with ``os.pread`` into a small
buffer and dropped after use: memory stays at N blocks plus the model.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fl_orchestrator.aggregation.chunks import CHUNK_ELEMENTS, LazyUpdate
from fl_orchestrator.core.reasons import Rejection
from fl_orchestrator.intake.safe_read import FileIdentity
from fl_orchestrator.wire.frames import WIRE_DTYPES, FrameLimits, decode_header
from fl_orchestrator.wire.parts import part_name

_HEADER_LIMITS = FrameLimits(max_header_bytes=64 * 1024 * 1024, max_elements=2**34)


class ResultGone(Exception):
    """A result counted earlier can no longer be read as it was."""


class _Concatenation:
    """One or more files read as a single byte sequence (a result written as parts)."""

    def __init__(self, paths: list[Path]) -> None:
        self.fds: list[int] = []
        self.starts: list[int] = []
        self.size = 0
        try:
            for path in paths:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                self.fds.append(fd)
                self.starts.append(self.size)
                self.size += os.fstat(fd).st_size
        except BaseException:
            self.close()
            raise

    def pread(self, count: int, offset: int) -> bytes:
        if len(self.fds) == 1:
            return os.pread(self.fds[0], count, offset)
        pieces = []
        index = max(0, bisect.bisect_right(self.starts, offset) - 1)
        while count > 0 and index < len(self.fds):
            piece = os.pread(self.fds[index], count, offset - self.starts[index])
            if not piece:
                break
            pieces.append(piece)
            count -= len(piece)
            offset += len(piece)
            index += 1
        return b"".join(pieces)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        offset = 0
        while offset < self.size:
            block = self.pread(min(1 << 22, self.size - offset), offset)
            if not block:
                break
            digest.update(block)
            offset += len(block)
        return digest.hexdigest()

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class FileUpdate(LazyUpdate):
    """One counted result file (or its parts), read on demand; validated when it was counted."""

    def __init__(self, path: Path, identity: FileIdentity | None, sha256: str | None = None) -> None:
        """Open ``path``; with ``identity``, refuse it unless it is still that file."""
        self.path = path
        info = os.stat(path, follow_symlinks=False)
        if identity is not None and (info.st_ino, info.st_size, info.st_mtime_ns) != (
            identity.inode,
            identity.size,
            identity.mtime_ns,
        ):
            raise ResultGone(f"{path} changed since it was counted")
        self._file = _Concatenation([path])
        try:
            head = self._file.pread(min(info.st_size, 64 * 1024), 0)
            parts, manifest_sha256 = _parts_of(head)
            if parts:
                self._file.close()
                self._file = _Concatenation([path.with_name(part_name(path.name, i)) for i in range(parts)])
            # The bytes folded must be the bytes validated: a file rewritten in place with
            # its size and mtime restored, or parts swapped, differ here.
            expected = sha256 or (manifest_sha256 if parts else None)
            if expected is not None and self._file.sha256() != expected:
                raise ResultGone(f"{path}: its bytes are not the ones validated when it was counted")
            header, offset = self._read_header(self._file.size)
            self._arrays: dict[str, tuple[int, np.dtype[Any], tuple[int, ...]]] = {}
            for name, dtype_name, shape in header["arrays"]:
                start = self._bin_start(offset)
                dtype = WIRE_DTYPES[dtype_name]
                self._arrays[name] = (start, dtype, tuple(shape))
                offset = start + math.prod(shape) * dtype.itemsize
        except BaseException:
            self._file.close()
            raise

    def _read_header(self, size: int) -> tuple[dict[str, Any], int]:
        # Headers are small: read 64 KiB first, more only if the header is longer.
        want = 64 * 1024
        while True:
            head = self._file.pread(min(size, want), 0)
            try:
                return decode_header(head, _HEADER_LIMITS)
            except Rejection:
                if want >= min(size, _HEADER_LIMITS.max_header_bytes):
                    raise ResultGone(f"{self.path} changed since it was counted (bad header)") from None
                want *= 16

    def _bin_start(self, offset: int) -> int:
        marker = self._file.pread(5, offset)
        width = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(marker[0]) if marker else None
        if width is None:
            raise ResultGone(f"{self.path} changed since it was counted (no bin at {offset})")
        return offset + 1 + width

    def read_block(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of the flattened array, as float64."""
        base, dtype, _ = self._arrays[name]
        count = stop - start
        data = self._file.pread(count * dtype.itemsize, base + start * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise ResultGone(f"{self.path} shrank since it was counted")
        return np.frombuffer(data, dtype=dtype).astype(np.float64)

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The array's shape, without reading it."""
        return self._arrays[name][2]

    def __getitem__(self, name: str) -> np.ndarray:
        _, dtype, shape = self._arrays[name]
        return _whole(self, name, dtype, shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __contains__(self, name: object) -> bool:
        # Mapping's default would read the whole array just to answer this.
        return name in self._arrays

    def __len__(self) -> int:
        return len(self._arrays)

    def close(self) -> None:
        """Release the file."""
        self._file.close()


def _parts_of(head: bytes) -> tuple[int, str]:
    """How many parts a result file stands for (0: it is the result itself), and their sha256."""
    try:
        header, _ = decode_header(head, _HEADER_LIMITS)
    except Rejection:
        return 0, ""
    parts = header.get("parts") if header.get("kind") == "parts" else 0
    if not isinstance(parts, int) or isinstance(parts, bool):
        return 0, ""
    return parts, str(header.get("sha256", ""))


def _whole(update: LazyUpdate, name: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    """A whole array assembled block by block (strategies that need one, e.g. Krum's winners)."""
    out = np.empty(math.prod(shape), dtype=dtype)
    for start in range(0, out.size, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, out.size)
        out[start:stop] = update.read_block(name, start, stop)
    return out.reshape(shape)
