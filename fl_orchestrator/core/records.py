"""The machine's plain data: the rules it follows, per-datasite accounting, the open attempt."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from fl_orchestrator.core.events import Metrics, RoundSummary
from fl_orchestrator.core.metrics import weighted_metrics


class Phase(StrEnum):
    """Where the job is."""

    STARTING = "starting"
    AWAITING_ROOT = "awaiting_root"  # a region between rounds: the root has not asked yet
    WAITING_FOR_NODES = "waiting_for_nodes"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class RoundRules:
    """The knobs of the round loop, copied out of the job config."""

    run_id: str
    datasites: tuple[str, ...]
    num_rounds: int
    round_timeout_seconds: float
    fraction_train: float
    min_train_nodes: int
    min_available_nodes: int
    available_timeout_seconds: float
    max_round_retries: int
    presence_ttl_seconds: float
    selection_seed: int
    fraction_evaluate: float = 0.0
    min_evaluate_nodes: int = 1
    # True where presence is not proof of life (syft-flwr: a published schema file):
    # a datasite that let a round time out is unavailable until it is seen again.
    timeout_means_gone: bool = False
    # A datasite's claimed num_examples may grow at most this factor over its first counted
    # claim (0: no limit): a datasite cannot earn trust and then take the aggregate over.
    max_num_examples_growth: float = 0.0
    outlier_norm_factor: float = 0.0
    # A region of a root job (docs/TIERS.md): a round opens only when the root asks for it,
    # and closes this many seconds before the root's deadline.
    paced_by_root: bool = False
    root_margin_seconds: float = 0.0


@dataclass
class DatasiteRecord:
    """One datasite across the whole job."""

    last_seen: float | None = None
    selected: int = 0
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    rejected: int = 0
    # Dispatch to counted result, summed over its successes (the round's view of its time).
    train_seconds_total: float = 0.0
    # The runner's own time in the train function, summed over the successes that reported it.
    runner_train_seconds_total: float = 0.0
    runner_timed: int = 0
    # num_examples of its first counted training result: what later claims are held to.
    first_num_examples: int | None = None
    # The update norm of its result in the last round aggregated with it (the outlier rule).
    last_update_norm: float | None = None


@dataclass
class Attempt:
    """The open attempt of the current round."""

    round: int
    attempt: int
    tasks: dict[str, str]
    dispatched_at: float
    deadline: float
    succeeded: dict[str, float] = field(default_factory=dict)
    num_examples: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Metrics] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    update_norms: dict[str, float] = field(default_factory=dict)

    def answered(self) -> set[str]:
        return set(self.succeeded) | set(self.failed)

    def has_answered(self, datasite: str) -> bool:
        return datasite in self.succeeded or datasite in self.failed

    def outstanding(self) -> set[str]:
        return set(self.tasks) - self.answered()

    def outstanding_count(self) -> int:
        """len(outstanding()) in O(1): only selected datasites answer, and each once (check_result)."""
        return len(self.tasks) - len(self.succeeded) - len(self.failed)

    def summary(self, now: float) -> RoundSummary:
        """What the attempt came to, closed at ``now``."""
        return RoundSummary(
            round=self.round,
            attempt=self.attempt,
            selected=tuple(sorted(self.tasks)),
            succeeded=tuple(sorted(self.succeeded)),
            failed=dict(sorted(self.failed.items())),
            timed_out=tuple(sorted(self.outstanding())),
            dispatched_at=self.dispatched_at,
            closed_at=now,
            train_seconds=dict(sorted(self.succeeded.items())),
            num_examples=sum(self.num_examples.values()),
            train_metrics=weighted_metrics(self.metrics, self.num_examples),
            metrics_by_datasite={d: dict(m) for d, m in sorted(self.metrics.items())},
            examples_by_datasite=dict(sorted(self.num_examples.items())),
        )
