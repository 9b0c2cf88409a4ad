"""Reading a file a datasite controls: no link followed, nothing read before it is judged.

Walks from a trusted root to the file one folder at a time with O_NOFOLLOW,
refuses anything but a regular file with the allowed number of links, and
bounds the size (and refuses sparse files) from fstat before reading a byte.

A walk costs one open per folder (six from the datasites folder down to a
job's results/), which was a third of the cost of refusing a junk file. A
``FolderCache`` keeps the folders it walked to open. A cached folder is used
again only while its path still leads to the very same folder (device and
inode, checked with one lstat); a folder that was replaced or swapped for a
link is walked to afresh. Reads through the cache therefore happen in a folder
that was reached without following a link, as every walk's do.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict
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


class FolderCache:
    """Folders already walked to without following links, kept open (at most ``size``)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._open: OrderedDict[Path, tuple[int, int, int]] = OrderedDict()  # folder: fd, dev, ino
        # Worker threads read at once (intake and the round loop's re-reads).
        self._lock = threading.Lock()

    def open_folder(self, root: Path, folder: Path, parts: tuple[str, ...]) -> int:
        """A new descriptor of ``folder`` (``root`` / ``parts``); the caller closes it."""
        with self._lock:
            cached = self._open.get(folder)
            if cached is not None:
                fd, dev, ino = cached
                try:
                    now = os.lstat(folder)
                    if (now.st_dev, now.st_ino) == (dev, ino) and stat.S_ISDIR(now.st_mode):
                        self._open.move_to_end(folder)
                        return os.dup(fd)
                except OSError:
                    pass
                del self._open[folder]
                os.close(fd)
        fd = walk_to_folder(root, parts)
        try:
            info = os.fstat(fd)
            kept = os.dup(fd)
        except OSError:
            os.close(fd)
            raise
        with self._lock:
            if folder in self._open:
                os.close(kept)  # another thread walked there at the same time
            else:
                self._open[folder] = (kept, info.st_dev, info.st_ino)
                while len(self._open) > self.size:
                    old_fd, _, _ = self._open.popitem(last=False)[1]
                    os.close(old_fd)
        return fd

    def close(self) -> None:
        """Close every kept folder."""
        with self._lock:
            for fd, _, _ in self._open.values():
                os.close(fd)
            self._open.clear()

    def __del__(self) -> None:
        # Readers come and go in tools and tests: their folders must not pile up as open files.
        self.close()


def walk_to_folder(root: Path, parts: tuple[str, ...]) -> int:
    """Open ``root`` / ``parts``, every part with O_NOFOLLOW; raise Rejection if that fails."""
    try:
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise Rejection(Reason.UNREADABLE, f"cannot open the datasites folder: {exc.strerror}") from None
    for part in parts:
        try:
            next_fd = _open_folder(dir_fd, part)
        finally:
            os.close(dir_fd)
        dir_fd = next_fd
    return dir_fd


def read_below(
    root: Path,
    path: Path,
    limit: int,
    *,
    max_links: int = 1,
    refuse_sparse: bool = False,
    folders: FolderCache | None = None,
) -> tuple[memoryview, FileIdentity]:
    """Read the regular file ``path`` under ``root`` without following any link below root.

    ``root`` itself is opened normally: it is the operator's configured
    folder and may be a link. Every folder after it is opened with
    O_NOFOLLOW relative to the one before, so no link, however it is swapped
    in, leads the read outside root or into another datasite's folder.
    With ``folders``, a folder walked to before is opened from the cache.
    """
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise Rejection(Reason.BAD_NAME, "the path is not under the datasites folder") from None
    if not parts or any(part in ("", ".", "..") for part in parts):
        raise Rejection(Reason.BAD_NAME, "the path has an empty, '.' or '..' part")
    if folders is None:
        dir_fd = walk_to_folder(root, parts[:-1])
    else:
        dir_fd = folders.open_folder(root, path.parent, parts[:-1])
    try:
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
