"""Paths waiting for the intake, one queue per party, served in turn.

A party that floods its folder with files only lengthens its own queue: the
intake takes one path from each party with work before it takes a second
from any, so another party's answer waits behind at most one path per
party. Each queue is bounded; a path dropped from a full queue is still on
disk, and once that party's queue runs dry the intake lists its folder again
(``drained_overflowed``). Pure: no I/O, no event loop.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from pathlib import Path


class FairQueue:
    """A round-robin over per-party FIFO queues of unique paths."""

    def __init__(self, per_party_limit: int) -> None:
        self.per_party_limit = per_party_limit
        # Parties in serving order, each with its paths in arrival order. A deque, not a dict
        # popped from the front: CPython's dict makes that linear per pop, a flood quadratic.
        self._queues: OrderedDict[str, deque[Path]] = OrderedDict()
        self._queued: set[Path] = set()
        self.dropped: dict[str, int] = {}
        # Parties that lost paths to a full queue since their queue last ran dry.
        self._overflowed: set[str] = set()

    def __len__(self) -> int:
        return len(self._queued)

    def __contains__(self, path: object) -> bool:
        return path in self._queued

    def push(self, party: str, path: Path) -> bool:
        """Queue ``path`` for ``party``; False if it was queued already or the queue is full."""
        if path in self._queued:
            return False
        queue = self._queues.get(party)
        if queue is None:
            queue = self._queues[party] = deque()
        if len(queue) >= self.per_party_limit:
            self.dropped[party] = self.dropped.get(party, 0) + 1
            self._overflowed.add(party)
            return False
        queue.append(path)
        self._queued.add(path)
        return True

    def drained_overflowed(self) -> list[str]:
        """Parties that dropped paths and now have none queued: time to look at their folder again."""
        drained = sorted(p for p in self._overflowed if not self._queues.get(p))
        self._overflowed.difference_update(drained)
        return drained

    def pop(self) -> Path | None:
        """The next path: the oldest of the party whose turn it is; None when all are empty."""
        while self._queues:
            party, queue = next(iter(self._queues.items()))
            if not queue:
                del self._queues[party]
                continue
            path = queue.popleft()
            self._queued.discard(path)
            # Its turn is over: to the back of the line (or out of it, if it has nothing left).
            if queue:
                self._queues.move_to_end(party)
            else:
                del self._queues[party]
            return path
        return None
