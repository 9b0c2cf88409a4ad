"""Named crash points for fault-injection tests.

``FL_ORCHESTRATOR_FAILPOINTS="round_log.after_append:3,checkpoint.before_write:1"``
makes the process SIGKILL itself on the 3rd pass through ``round_log.after_append``
and so on. Unset (always, in production) each ``hit`` is one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "FL_ORCHESTRATOR_FAILPOINTS"


def _parse(text: str) -> dict[str, int]:
    points: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition(":")
        points[name] = int(count) if count.isdigit() else 1
    return points


_armed = _parse(os.environ.get(ENV, ""))


def hit(name: str) -> None:
    """Pass a crash point; die like kill -9 if it is armed and its count runs out."""
    if not _armed or name not in _armed:
        return
    _armed[name] -= 1
    if _armed[name] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


def arm(spec: str) -> None:
    """Arm crash points in this process (tests); replaces what was armed."""
    _armed.clear()
    _armed.update(_parse(spec))
