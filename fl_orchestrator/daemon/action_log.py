"""One log event per machine action that has nothing to do but be reported."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from fl_orchestrator.core import events as ev

log = structlog.get_logger("fl_orchestrator.daemon")

# While datasites come up one heartbeat at a time, the wait is reported at most this often
# (a thousand datasites starting made a thousand lines).
WAITING_LOG_INTERVAL_SECONDS = 1.0


class WaitingLog:
    """Whether a ``round.waiting_for_nodes`` line is due: the first, then one a second."""

    def __init__(self) -> None:
        self.last: tuple[int, float] | None = None

    def due(self, rnd: int, now: float) -> bool:
        """True for the first wait of a round, then once per interval."""
        last = self.last
        if last is not None and last[0] == rnd and now - last[1] < WAITING_LOG_INTERVAL_SECONDS:
            return False
        self.last = (rnd, now)
        return True


def log_action(action: ev.Action, clock: Callable[[], float], waiting: WaitingLog | None = None) -> None:
    """Report RecordFailure, AwaitNodes (throttled by ``waiting``) and AbandonAttempt."""
    if isinstance(action, ev.RecordFailure):
        log.warning(
            "result.failed",
            round=action.round,
            datasite=action.datasite,
            error_type=action.error_type,
            error_message=action.error_message,
        )
    elif isinstance(action, ev.AwaitNodes):
        if waiting is not None and not waiting.due(action.round, clock()):
            return
        # Waiting is the normal start of a round (datasites come and go): info, not a warning.
        log.info(
            "round.waiting_for_nodes",
            round=action.round,
            available=len(action.available),
            needed=action.needed,
            missing_count=len(action.missing),
            missing=list(action.missing[:20]),  # a thousand names per heartbeat would flood the log
            wait_seconds_left=round(action.until - clock(), 3),
        )
    elif isinstance(action, ev.AbandonAttempt):
        log.warning(
            "round.attempt_failed",
            round=action.summary.round,
            attempt=action.summary.attempt,
            reason=action.reason,
            retry=action.retry,
            succeeded=list(action.summary.succeeded),
            failed=action.summary.failed,
            timed_out=list(action.summary.timed_out),
        )


def log_round_completed(
    summary: ev.RoundSummary,
    *,
    evaluate: dict[str, float],
    collect_seconds: float,
    aggregate_seconds: float,
    model: str,
) -> None:
    """The per-round summary line operators tail."""
    log.info(
        "round.completed",
        round=summary.round,
        phase="aggregate",
        sent=len(summary.selected),
        succeeded=len(summary.succeeded),
        failed=len(summary.failed),
        timed_out=len(summary.timed_out),
        stragglers=list(summary.timed_out),
        failures=summary.failed,
        num_examples=summary.num_examples,
        train_metrics=summary.train_metrics,
        evaluate_metrics=evaluate,
        collect_seconds=collect_seconds,
        aggregate_seconds=round(aggregate_seconds, 6),
        model=model,
    )
