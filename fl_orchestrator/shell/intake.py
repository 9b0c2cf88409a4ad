"""The decoding edge: one inbound path becomes one event or one rejection.

Runs in a worker thread. Opens without following links and without blocking
on fifos, bounds the size before reading, decodes, and checks the weights
against the global model's names, dtypes and shapes. Nothing raised by a
hostile file gets past ``read_inbound``.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from fl_orchestrator.config.schema import LimitsSection
from fl_orchestrator.wire.frames import FrameLimits
from fl_orchestrator.wire.layout import FileKind, JobLayout
from fl_orchestrator.wire.messages import (
    HeartbeatMessage,
    ModelSpec,
    ResultMessage,
    check_weights_match,
    decode_message,
)
from fl_orchestrator.wire.reasons import Reason, Rejection

_HEARTBEAT_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class FileIdentity:
    """What makes a file 'the same file' for deduplication."""

    inode: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Inbound:
    """A decoded inbound file."""

    path: Path
    datasite: str
    identity: FileIdentity
    message: ResultMessage | HeartbeatMessage


@dataclass(frozen=True)
class Refused:
    """An inbound file the edge refused."""

    path: Path
    datasite: str
    reason: Reason
    detail: str
    identity: FileIdentity | None


class InboundReader:
    """Reads and validates files that datasites write for one job."""

    def __init__(
        self,
        layout: JobLayout,
        datasites: frozenset[str],
        spec: ModelSpec,
        limits: LimitsSection,
    ) -> None:
        self.layout = layout
        self.datasites = datasites
        self.spec = spec
        self.limits = limits
        self.frame_limits = FrameLimits(max_header_bytes=limits.max_header_bytes)
        self.root_real = layout.datasites_dir.resolve()

    def read_inbound(self, path: Path, kind: FileKind, datasite: str) -> Inbound | Refused:
        """Decode one file; never raises for anything the file contains."""
        identity: FileIdentity | None = None
        try:
            if datasite not in self.datasites:
                raise Rejection(Reason.UNKNOWN_DATASITE, f"{datasite!r} is not in this job")
            self._check_parents(path)
            limit = _HEARTBEAT_MAX_BYTES if kind == FileKind.HEARTBEAT else self.limits.max_file_bytes
            data, identity = _read_regular_file(path, limit)
            if kind == FileKind.HEARTBEAT:
                beat = decode_message(
                    data, expect_kind="heartbeat", expect_job=self.layout.job, limits=self.frame_limits
                )
                assert isinstance(beat, HeartbeatMessage)
                return Inbound(path, datasite, identity, beat)
            result = decode_message(
                data,
                expect_kind="result",
                expect_job=self.layout.job,
                limits=self.frame_limits,
                max_metrics=self.limits.max_metrics,
                max_num_examples=self.limits.max_num_examples,
            )
            assert isinstance(result, ResultMessage)
            if result.ok:
                check_weights_match(result.arrays, self.spec)
            return Inbound(path, datasite, identity, result)
        except Rejection as exc:
            return Refused(path, datasite, exc.reason, exc.detail, identity)

    def _check_parents(self, path: Path) -> None:
        """Refuse a path whose folders lead outside datasites/ through a link."""
        parent_real = path.parent.resolve()
        if not parent_real.is_relative_to(self.root_real):
            raise Rejection(Reason.SYMLINK, f"{path.parent} resolves outside the SyftBox root")


def _read_regular_file(path: Path, limit: int) -> tuple[bytearray, FileIdentity]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Rejection(Reason.SYMLINK, "the file is a symbolic link") from None
        if exc.errno == errno.ENOENT:
            raise Rejection(Reason.UNREADABLE, "the file vanished before it was read") from None
        raise Rejection(Reason.UNREADABLE, f"cannot open: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Rejection(Reason.NOT_REGULAR_FILE, f"mode {stat.filemode(info.st_mode)}")
        if info.st_nlink > 1:
            raise Rejection(Reason.HARD_LINK, f"the file has {info.st_nlink} links")
        if info.st_size == 0:
            raise Rejection(Reason.EMPTY_FILE, "the file is empty")
        if info.st_size > limit:
            raise Rejection(Reason.FILE_TOO_LARGE, f"{info.st_size} bytes; the limit is {limit}")
        identity = FileIdentity(info.st_ino, info.st_size, info.st_mtime_ns)
        buffer = bytearray(info.st_size)
        view = memoryview(buffer)
        filled = 0
        while filled < info.st_size:
            count = os.readv(fd, [view[filled:]])
            if count == 0:
                raise Rejection(Reason.TRUNCATED, f"the file shrank to {filled} bytes while read")
            filled += count
        if os.read(fd, 1):
            raise Rejection(Reason.TRUNCATED, "the file grew while it was read")
        return buffer, identity
    except OSError as exc:
        raise Rejection(Reason.UNREADABLE, f"read failed: {exc.strerror}") from None
    finally:
        os.close(fd)
