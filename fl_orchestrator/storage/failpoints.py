"""Named crash points and injected write faults, for fault-injection tests.

``FL_ORCHESTRATOR_FAILPOINTS="round_log.after_append:3,checkpoint.before_write:1"``
makes the process SIGKILL itself on the 3rd pass through ``round_log.after_append``
and so on. Before it dies it writes ``failpoint NAME`` to stderr, so a test can
tell which point fired.

``FL_ORCHESTRATOR_FAULT_FILE=/path`` makes every state write fail while that
file exists, with the errno named in it (``ENOSPC``, ``EACCES``, ``EROFS``,
``EIO``; ``ENOSPC`` if it is empty). A test creates the file to start a fault
and removes it to end one, from outside the process.

Unset (always, in production) each ``hit`` is one dict lookup and each
``check_write`` one comparison.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "FL_ORCHESTRATOR_FAILPOINTS"
FAULT_FILE_ENV = "FL_ORCHESTRATOR_FAULT_FILE"


def _parse(text: str) -> dict[str, int]:
    points: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition(":")
        points[name] = int(count) if count.isdigit() else 1
    return points


_armed = _parse(os.environ.get(ENV, ""))
_fault_file = os.environ.get(FAULT_FILE_ENV) or None


def hit(name: str) -> None:
    """Pass a crash point; die like kill -9 if it is armed and its count runs out."""
    if not _armed or name not in _armed:
        return
    _armed[name] -= 1
    if _armed[name] <= 0:
        os.write(2, f"failpoint {name}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


def arm(spec: str) -> None:
    """Arm crash points in this process (tests); replaces what was armed."""
    _armed.clear()
    _armed.update(_parse(spec))


def inject_faults(path: str | None) -> None:
    """Make state writes fail while ``path`` exists (tests); None switches it off."""
    global _fault_file
    _fault_file = path


def check_write(target: object) -> None:
    """Raise the injected OSError for a write to ``target`` while a fault is on."""
    if _fault_file is None:
        return
    try:
        with open(_fault_file, encoding="ascii") as handle:
            name = handle.read().strip() or "ENOSPC"
    except FileNotFoundError:
        return
    code = getattr(errno, name, errno.EIO)
    raise OSError(code, os.strerror(code), str(target))
