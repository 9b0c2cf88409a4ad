"""Reading a file a datasite controls: no link followed, nothing read before it is judged.

Walks from a trusted root to the file one folder at a time with O_NOFOLLOW,
refuses anything but a regular file with the allowed number of links, and
bounds the size (and refuses sparse files) from fstat before reading a byte.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_orchestrator.core.reasons import Reason, Rejection, describe

# Sparse-file rule: a file this big that has under 1/8 of its size allocated on disk.
SPARSE_MIN_BYTES = 1 << 20
SPARSE_MAX_HOLES = 8
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the lstat must not block the thread.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


@dataclass(frozen=True)
class FileIdentity:
    """What makes a file 'the same file' for deduplication."""

    inode: int
    size: int
    mtime_ns: int


def read_below(
    root: Path, path: Path, limit: int, *, max_links: int = 1, refuse_sparse: bool = False
) -> tuple[memoryview, FileIdentity]:
    """Read the regular file ``path`` under ``root`` without following any link below root.

    ``root`` itself is opened normally: it is the operator's configured
    folder and may be a link. Every folder after it is opened with
    O_NOFOLLOW relative to the one before, so no link, however it is swapped
    in, leads the read outside root or into another datasite's folder.
    """
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise Rejection(Reason.BAD_NAME, "the path is not under the datasites folder") from None
    if not parts or any(part in ("", ".", "..") for part in parts):
        raise Rejection(Reason.BAD_NAME, "the path has an empty, '.' or '..' part")
    try:
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise Rejection(Reason.UNREADABLE, f"cannot open the datasites folder: {exc.strerror}") from None
    try:
        for part in parts[:-1]:
            next_fd = _open_folder(dir_fd, part)
            os.close(dir_fd)
            dir_fd = next_fd
        return _read_entry(dir_fd, parts[-1], limit, max_links, refuse_sparse)
    finally:
        os.close(dir_fd)


def _open_folder(dir_fd: int, name: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise Rejection(Reason.VANISHED, "the file vanished before it was read") from None
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            # Linux says ENOTDIR for O_NOFOLLOW|O_DIRECTORY on a link; look.
            try:
                mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            except OSError:
                mode = 0
            if stat.S_ISLNK(mode):
                detail = f"folder {describe(name)} on the path is a symbolic link"
                raise Rejection(Reason.SYMLINK, detail) from None
        raise Rejection(Reason.UNREADABLE, f"cannot open folder {describe(name)}: {exc.strerror}") from None


def _check_info(info: os.stat_result, limit: int, max_links: int, refuse_sparse: bool = False) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise Rejection(Reason.SYMLINK, "the file is a symbolic link")
    if not stat.S_ISREG(info.st_mode):
        raise Rejection(Reason.NOT_REGULAR_FILE, f"mode {stat.filemode(info.st_mode)}")
    if info.st_nlink > max_links:
        raise Rejection(Reason.HARD_LINK, f"the file has {info.st_nlink} links")
    if info.st_size == 0:
        raise Rejection(Reason.EMPTY_FILE, "the file is empty")
    if info.st_size > limit:
        raise Rejection(Reason.FILE_TOO_LARGE, f"{info.st_size} bytes; the limit is {limit}")
    allocated = info.st_blocks * 512
    if refuse_sparse and info.st_size >= SPARSE_MIN_BYTES and allocated * SPARSE_MAX_HOLES < info.st_size:
        raise Rejection(
            Reason.SPARSE_FILE,
            f"{info.st_size} bytes long but {allocated} on disk: mostly holes, not read",
        )


def _read_entry(
    dir_fd: int, name: str, limit: int, max_links: int, refuse_sparse: bool
) -> tuple[memoryview, FileIdentity]:
    # lstat first, so a FIFO or device is refused without ever being opened.
    try:
        _check_info(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), limit, max_links, refuse_sparse)
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Rejection(Reason.SYMLINK, "the file is a symbolic link") from None
        if exc.errno == errno.ENOENT:
            raise Rejection(Reason.VANISHED, "the file vanished before it was read") from None
        raise Rejection(Reason.UNREADABLE, f"cannot open: {exc.strerror}") from None
    try:
        # fstat is the check that counts: it describes what was opened.
        info = os.fstat(fd)
        _check_info(info, limit, max_links, refuse_sparse)
        identity = FileIdentity(info.st_ino, info.st_size, info.st_mtime_ns)
        # Not bytearray: it zero-fills while holding the GIL, which cost a third of
        # ingest time. Every byte is overwritten below or the read is refused.
        view = np.empty(info.st_size, dtype=np.uint8).data
        filled = 0
        while filled < info.st_size:
            count = os.readv(fd, [view[filled:]])
            if count == 0:
                raise Rejection(Reason.TRUNCATED, f"the file shrank to {filled} bytes while read")
            filled += count
        if os.read(fd, 1):
            raise Rejection(Reason.TRUNCATED, "the file grew while it was read")
        return view, identity
    except OSError as exc:
        raise Rejection(Reason.UNREADABLE, f"read failed: {exc.strerror}") from None
    finally:
        os.close(fd)
