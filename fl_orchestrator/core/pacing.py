"""A region's rounds are paced by its root job (docs/TIERS.md).

A region is one datasite of a root job. It opens round r only when the root
asks for round r, with the root's model, and it must answer before the root's
deadline: every deadline of the region's round is capped at the root's minus a
margin, which leaves time for the answer to be written and synced.
"""

from __future__ import annotations

from dataclasses import dataclass

from fl_orchestrator.core.events import RootTask


@dataclass
class RootPacing:
    """What the root last asked this region for, and by when."""

    margin_seconds: float
    round: int | None = None
    deadline: float | None = None

    def take(self, event: RootTask) -> None:
        """The root asked (again) for a round: its deadline is the one to meet."""
        self.round = event.round
        self.deadline = event.deadline

    def cap(self, deadline: float) -> float:
        """``deadline``, or earlier if the root's answer is due sooner."""
        if self.deadline is None:
            return deadline
        return min(deadline, self.deadline - self.margin_seconds)

    def too_late(self, now: float) -> bool:
        """True when no retry could still be answered in time."""
        return self.deadline is not None and now >= self.deadline - self.margin_seconds
