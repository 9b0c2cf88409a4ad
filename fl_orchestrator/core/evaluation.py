"""Federated evaluation: after a round's aggregate, selected datasites score it locally.

Pure, like the round machine that drives it. Evaluation is best effort: it
never retries and never fails the job; too few datasites present means the
phase is skipped with a reason, and stragglers are counted, not waited for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fl_orchestrator.core.events import EvaluationDone, Metrics, ResultReceived
from fl_orchestrator.core.reasons import Reason
from fl_orchestrator.core.selection import select_datasites, task_id

# Training attempts count from 1, so attempt 0 never collides with them in task ids.
EVALUATION_ATTEMPT = 0


@dataclass
class EvaluationRound:
    """The open evaluation of one round's model."""

    round: int
    tasks: dict[str, str]
    dispatched_at: float
    deadline: float
    num_examples: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Metrics] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def outstanding(self) -> set[str]:
        """Selected datasites that have not answered."""
        return set(self.tasks) - set(self.num_examples) - set(self.failed)

    def outstanding_count(self) -> int:
        """len(outstanding()) in O(1): only selected datasites answer, and each once (check)."""
        return len(self.tasks) - len(self.num_examples) - len(self.failed)

    def check(self, event: ResultReceived) -> tuple[Reason, str] | None:
        """Why this evaluation result cannot count, or None."""
        expected = self.tasks.get(event.datasite)
        if expected is None:
            return Reason.NOT_SELECTED, f"not selected to evaluate round {self.round}"
        if event.reply_to != expected:
            return Reason.REPLY_TO_MISMATCH, f"reply_to {event.reply_to!r} is not this evaluation's task"
        if event.datasite in self.num_examples or event.datasite in self.failed:
            return Reason.DUPLICATE, f"already answered the evaluation of round {self.round}"
        return None

    def record(self, event: ResultReceived) -> None:
        """Count one answer."""
        if event.ok:
            self.num_examples[event.datasite] = event.num_examples
            self.metrics[event.datasite] = dict(event.metrics)
        else:
            self.failed[event.datasite] = event.error_type or "Error"

    def summary(self, now: float, merged: Metrics) -> EvaluationDone:
        """What the evaluation produced, for the shell to log and record."""
        return EvaluationDone(
            round=self.round,
            selected=tuple(sorted(self.tasks)),
            succeeded=tuple(sorted(self.num_examples)),
            failed=dict(sorted(self.failed.items())),
            timed_out=tuple(sorted(self.outstanding())),
            num_examples=sum(self.num_examples.values()),
            metrics=merged,
            seconds=max(0.0, now - self.dispatched_at),
        )


def start_evaluation(
    *,
    run_id: str,
    rnd: int,
    available: tuple[str, ...],
    fraction: float,
    minimum: int,
    seed: int,
    now: float,
    timeout_seconds: float,
) -> EvaluationRound | None:
    """Select evaluators for round rnd's model, or None if fewer than ``minimum`` are present."""
    if len(available) < minimum:
        return None
    selected = select_datasites(
        available, fraction=fraction, minimum=minimum, seed=seed, rnd=rnd, attempt=EVALUATION_ATTEMPT
    )
    tasks = {d: task_id(run_id, rnd, EVALUATION_ATTEMPT, d) for d in selected}
    return EvaluationRound(rnd, tasks, now, now + timeout_seconds)
