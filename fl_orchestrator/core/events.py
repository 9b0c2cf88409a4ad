"""What goes into the round state machine, and what comes out.

Events carry the time they happened (``now``, seconds on the wall clock) so the
machine never reads a clock; tests drive it with a fake one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fl_orchestrator.core.reasons import Reason

Metrics = dict[str, int | float]


# ---- events -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The service is up and watching.

    ``fresh_deadline``: a restart grants the open attempt a full
    ``round_timeout_seconds`` from now (``daemon.restart_grants_fresh_timeout``).
    """

    now: float
    fresh_deadline: bool = False


@dataclass(frozen=True)
class AttemptReplayed:
    """After a restart: an attempt the round log says was dispatched, exactly as it was."""

    attempt: int
    tasks: dict[str, str]
    dispatched_at: float
    deadline: float


@dataclass(frozen=True)
class Aborted:
    """Something outside the round (a user hook) failed the job; ``reason`` says what."""

    now: float
    reason: str


@dataclass(frozen=True)
class NodeSeen:
    """A datasite's heartbeat arrived.

    ``now`` is when the daemon read it, and sets any deadline this event
    starts; ``seen_at`` is when the datasite wrote it (default: ``now``), and
    only says how fresh its presence is. A heartbeat left behind before a
    restart is old, and must not make a round's deadline lie in the past.
    """

    now: float
    datasite: str
    seen_at: float | None = None


@dataclass(frozen=True)
class NodesSeen:
    """Several heartbeats read together (one scan): a round starts only after all of them count.

    Fed one by one, the first would start a round whose minimum it meets, and
    the others, present all along, would miss it.
    """

    now: float
    seen: tuple[NodeSeen, ...]


@dataclass(frozen=True)
class ResultReceived:
    """A result file decoded cleanly; the machine decides whether it counts.

    ``payload`` is the shell's handle on the weights; the machine only passes it on.
    """

    now: float
    datasite: str
    round: int
    reply_to: str | None
    ok: bool
    num_examples: int = 0
    metrics: Metrics = field(default_factory=dict)
    error_type: str | None = None
    error_message: str | None = None
    payload: Any = None
    purpose: str = "train"  # or "evaluate": a federated-evaluation answer
    # ||result - the round's model||, when the intake measured it (the outlier rule).
    update_norm: float | None = None
    # The runner's own seconds in the train function, when it said (native runners do).
    runner_seconds: float | None = None


@dataclass(frozen=True)
class Tick:
    """A timer the machine asked for has fired (or a rescan happened)."""

    now: float


@dataclass(frozen=True)
class RoundAggregated:
    """The shell folded, finalised and saved the round's model."""

    now: float
    round: int


@dataclass(frozen=True)
class AggregationFailed:
    """The shell could not produce the round's model."""

    now: float
    round: int
    error: str


@dataclass(frozen=True)
class RootTask:
    """A region only: the root job asked for round ``round``, to be answered by ``deadline``.

    The shell has already made the root's model the round's model; the machine
    opens the round (or, for a round it already runs, takes the new deadline).
    """

    now: float
    round: int
    deadline: float | None


@dataclass(frozen=True)
class RootEnded:
    """A region only: the root job has ended, so no more rounds will be asked for."""

    now: float


Event = (
    Started
    | AttemptReplayed
    | Aborted
    | NodeSeen
    | NodesSeen
    | ResultReceived
    | Tick
    | RoundAggregated
    | AggregationFailed
    | RootTask
    | RootEnded
)


# ---- actions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AwaitNodes:
    """Too few datasites are present; say who is missing and until when we wait."""

    round: int
    available: tuple[str, ...]
    missing: tuple[str, ...]
    needed: int
    until: float


@dataclass(frozen=True)
class Dispatch:
    """Write the round's model (once) and one task per selected datasite."""

    round: int
    attempt: int
    tasks: dict[str, str]  # datasite -> task id
    deadline: float
    created: float
    purpose: str = "train"  # or "evaluate": score the round's new model, send no weights back


@dataclass(frozen=True)
class Accept:
    """Fold this result into the round's aggregate."""

    round: int
    attempt: int
    datasite: str
    num_examples: int
    payload: Any


@dataclass(frozen=True)
class RecordFailure:
    """A selected datasite reported that its training failed."""

    round: int
    datasite: str
    error_type: str
    error_message: str


@dataclass(frozen=True)
class Reject:
    """Do not use this result: quarantine it with a reason."""

    datasite: str
    reason: Reason
    detail: str
    payload: Any


@dataclass(frozen=True)
class RoundSummary:
    """Who was asked, who answered and how long it took."""

    round: int
    attempt: int
    selected: tuple[str, ...]
    succeeded: tuple[str, ...]
    failed: dict[str, str]
    timed_out: tuple[str, ...]
    dispatched_at: float
    closed_at: float
    train_seconds: dict[str, float]
    num_examples: int
    train_metrics: Metrics
    metrics_by_datasite: dict[str, Metrics] = field(default_factory=dict)
    examples_by_datasite: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AbandonAttempt:
    """The attempt missed min_train_nodes: drop its partial aggregate."""

    summary: RoundSummary
    reason: str
    retry: bool


@dataclass(frozen=True)
class Aggregate:
    """Finish the round's aggregate, save it and report RoundAggregated."""

    summary: RoundSummary


@dataclass(frozen=True)
class EvaluationDone:
    """Federated evaluation of a round's model ended (all answered, or its deadline passed)."""

    round: int
    selected: tuple[str, ...]
    succeeded: tuple[str, ...]
    failed: dict[str, str]
    timed_out: tuple[str, ...]
    num_examples: int
    metrics: Metrics
    seconds: float


@dataclass(frozen=True)
class EvaluationSkipped:
    """Federated evaluation of a round's model did not start."""

    round: int
    reason: str


@dataclass(frozen=True)
class AwaitRoot:
    """A region only: round ``round`` opens when the root asks for it."""

    round: int


@dataclass(frozen=True)
class RootRoundFailed:
    """A region only: this round cannot be answered; the root counts the region as failed."""

    round: int
    reason: str


@dataclass(frozen=True)
class JobFinished:
    """All rounds are done."""

    rounds: int


@dataclass(frozen=True)
class JobFailed:
    """The job cannot go on."""

    reason: str


Action = (
    AwaitNodes
    | Dispatch
    | Accept
    | RecordFailure
    | Reject
    | AbandonAttempt
    | Aggregate
    | EvaluationDone
    | EvaluationSkipped
    | AwaitRoot
    | RootRoundFailed
    | JobFinished
    | JobFailed
)
