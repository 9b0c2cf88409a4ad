"""The round state machine: distribute -> train -> collect -> aggregate.

Pure: no I/O, no clock, no event loop. ``handle(event)`` returns the actions
the shell must carry out, and ``next_wakeup()`` says when to send the next Tick.
"""

from __future__ import annotations

from fl_orchestrator.core.admission import check_result
from fl_orchestrator.core.evaluation import EVALUATION_ATTEMPT, EvaluationRound, start_evaluation
from fl_orchestrator.core.events import (
    AbandonAttempt,
    Aborted,
    Accept,
    Action,
    Aggregate,
    AggregationFailed,
    AttemptReplayed,
    AwaitNodes,
    AwaitRoot,
    Dispatch,
    EvaluationSkipped,
    Event,
    JobFailed,
    JobFinished,
    NodeSeen,
    NodesSeen,
    RecordFailure,
    Reject,
    ResultReceived,
    RootEnded,
    RootRoundFailed,
    RootTask,
    RoundAggregated,
    Started,
    Tick,
)
from fl_orchestrator.core.metrics import weighted_metrics
from fl_orchestrator.core.outliers import reference_norm
from fl_orchestrator.core.pacing import RootPacing
from fl_orchestrator.core.reasons import Reason
from fl_orchestrator.core.records import Attempt, DatasiteRecord, Phase, RoundRules
from fl_orchestrator.core.selection import select_datasites, task_id

__all__ = ["Attempt", "DatasiteRecord", "Phase", "RoundMachine", "RoundRules", "weighted_metrics"]


class RoundMachine:
    """Drives one job through its rounds; see the module docstring."""

    def __init__(
        self,
        rules: RoundRules,
        *,
        first_round: int = 1,
        records: dict[str, dict[str, float | int | None]] | None = None,
    ) -> None:
        """Start at ``first_round``, with per-datasite accounting from a checkpoint if resuming."""
        self.rules = rules
        self.phase = Phase.STARTING
        self.round = first_round
        self.attempt_number = 0
        self.current: Attempt | None = None
        self.wait_until: float | None = None
        self.last_missing: tuple[str, ...] | None = None
        self.records = {d: DatasiteRecord() for d in rules.datasites}
        self.evaluation: EvaluationRound | None = None
        # The outlier rule's reference for the open attempt, fixed when it starts.
        self.reference_norm: float | None = None
        self.pacing = RootPacing(rules.root_margin_seconds) if rules.paced_by_root else None
        if records:
            self._restore_records(records)

    # ---- public --------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; return the actions it calls for."""
        if isinstance(event, NodeSeen):
            return self._on_node_seen(event)
        if isinstance(event, NodesSeen):
            for seen in event.seen:
                self._note_presence(seen)
            return self._try_dispatch(event.now) if self.phase == Phase.WAITING_FOR_NODES else []
        if isinstance(event, ResultReceived):
            return self._on_result(event)
        if self.phase in (Phase.DONE, Phase.FAILED):
            return []
        if isinstance(event, RootTask | RootEnded):
            return self._on_root(event)
        if isinstance(event, AttemptReplayed):
            self._replay_attempt(event)
            return []
        if isinstance(event, Aborted):
            return self._fail(event.reason)
        if isinstance(event, Started):
            if self.round > self.rules.num_rounds and self.pacing is None:
                self.phase = Phase.DONE
                return [JobFinished(self.rules.num_rounds)]
            if self.phase in (Phase.TRAINING, Phase.AGGREGATING):
                if event.fresh_deadline and self.phase == Phase.TRAINING and self.current is not None:
                    self.current.deadline = self._deadline(event.now + self.rules.round_timeout_seconds)
                return []  # resumed mid-round: nothing to start
            return self._enter_waiting(event.now)
        if isinstance(event, Tick):
            return self._on_tick(event.now)
        if isinstance(event, RoundAggregated):
            return self._on_aggregated(event)
        if isinstance(event, AggregationFailed):
            return self._fail(f"round {event.round} aggregation failed: {event.error}")
        raise TypeError(f"unknown event {event!r}")

    def next_wakeup(self) -> float | None:
        """When the shell should send the next Tick, if anything is time-bound."""
        if self.phase == Phase.WAITING_FOR_NODES:
            return self.wait_until
        if self.phase == Phase.TRAINING and self.current is not None:
            return self.current.deadline
        if self.phase == Phase.EVALUATING and self.evaluation is not None:
            return self.evaluation.deadline
        return None

    def records_snapshot(self) -> dict[str, dict[str, float | int | None]]:
        """Per-datasite accounting as plain data, for checkpoints."""
        return {name: dict(vars(record)) for name, record in self.records.items()}

    def _restore_records(self, snapshot: dict[str, dict[str, float | int | None]]) -> None:
        """Load accounting saved by records_snapshot (unknown datasites are dropped)."""
        for name, values in snapshot.items():
            if name in self.records:
                for key, value in values.items():
                    if key != "last_seen" and hasattr(self.records[name], key):
                        setattr(self.records[name], key, value)

    def _replay_attempt(self, event: AttemptReplayed) -> None:
        """Re-enter an attempt recorded before a restart, exactly as it was dispatched."""
        self.attempt_number = event.attempt
        self.current = Attempt(
            self.round, event.attempt, dict(event.tasks), event.dispatched_at, event.deadline
        )
        self.reference_norm = reference_norm(self.records.values())
        for d in event.tasks:
            if d in self.records:
                self.records[d].selected += 1
        self.phase = Phase.TRAINING
        self.evaluation = None  # an evaluation is best effort and never replayed
        self.wait_until = None
        self.last_missing = None

    def available(self, now: float) -> tuple[str, ...]:
        """Datasites whose last heartbeat is recent enough."""
        horizon = now - self.rules.presence_ttl_seconds
        return tuple(d for d, r in self.records.items() if r.last_seen is not None and r.last_seen >= horizon)

    # ---- presence and dispatch ---------------------------------------------------------

    def _on_node_seen(self, event: NodeSeen) -> list[Action]:
        if self._note_presence(event) and self.phase == Phase.WAITING_FOR_NODES:
            return self._try_dispatch(event.now)
        return []

    def _note_presence(self, event: NodeSeen) -> bool:
        """Record a heartbeat; False if the datasite is not in the job."""
        record = self.records.get(event.datasite)
        if record is None:
            return False
        seen_at = event.now if event.seen_at is None else min(event.seen_at, event.now)
        record.last_seen = max(record.last_seen or seen_at, seen_at)
        return True

    def _on_root(self, event: RootTask | RootEnded) -> list[Action]:
        pacing = self.pacing
        if pacing is None:
            return []  # not a region: nothing paces this job
        if isinstance(event, RootEnded):
            self.phase = Phase.DONE
            self.current = None
            return [JobFinished(self.round - 1)]
        if event.round < self.round or (pacing.round is not None and event.round < pacing.round):
            return []  # an older round: the shell answers it from what it saved, or says it failed
        pacing.take(event)
        if self.phase == Phase.AWAITING_ROOT:
            return self._enter_waiting(event.now)
        if event.round == self.round and self.current is not None and self.phase == Phase.TRAINING:
            # Asked again for the open round (a restart on either side): the root's deadline holds.
            self.current.deadline = pacing.cap(self.current.deadline)
        return []  # busy with this or an earlier round: the round asked for opens after it

    def _deadline(self, deadline: float) -> float:
        return deadline if self.pacing is None else self.pacing.cap(deadline)

    def _enter_waiting(self, now: float) -> list[Action]:
        asked = None if self.pacing is None else self.pacing.round
        if self.pacing is not None and (asked is None or asked < self.round):
            self.phase = Phase.AWAITING_ROOT
            self.wait_until = None
            return [AwaitRoot(self.round)]
        if asked is not None and asked > self.round:
            self.round = asked  # the root did not ask this region for the rounds between
            self.attempt_number = 0
        if self.pacing is not None and self.pacing.too_late(now):
            self.current = None
            return self._fail_round("the root's deadline, less the margin, has passed", now)
        self.phase = Phase.WAITING_FOR_NODES
        self.wait_until = self._deadline(now + self.rules.available_timeout_seconds)
        self.last_missing = None
        return self._try_dispatch(now)

    def _try_dispatch(self, now: float) -> list[Action]:
        available = self.available(now)
        if len(available) < self.rules.min_available_nodes:
            present = set(available)  # a tuple lookup here made start-up cubic in the datasites
            missing = tuple(d for d in self.rules.datasites if d not in present)
            if missing == self.last_missing:
                return []
            self.last_missing = missing
            assert self.wait_until is not None
            return [
                AwaitNodes(self.round, available, missing, self.rules.min_available_nodes, self.wait_until)
            ]
        self.attempt_number += 1
        selected = select_datasites(
            available,
            fraction=self.rules.fraction_train,
            minimum=self.rules.min_train_nodes,
            seed=self.rules.selection_seed,
            rnd=self.round,
            attempt=self.attempt_number,
        )
        tasks = {d: task_id(self.rules.run_id, self.round, self.attempt_number, d) for d in selected}
        deadline = self._deadline(now + self.rules.round_timeout_seconds)
        self.current = Attempt(self.round, self.attempt_number, tasks, now, deadline)
        self.reference_norm = reference_norm(self.records.values())
        for d in selected:
            self.records[d].selected += 1
        self.phase = Phase.TRAINING
        self.wait_until = None
        return [Dispatch(self.round, self.attempt_number, dict(tasks), deadline, now)]

    # ---- collection --------------------------------------------------------------------

    def _on_result(self, event: ResultReceived) -> list[Action]:
        record = self.records.get(event.datasite)
        if record is None:
            return [Reject(event.datasite, Reason.UNKNOWN_DATASITE, "not in this job", event.payload)]
        if event.purpose == "evaluate":
            return self._on_evaluation_result(event, record)
        rejection = check_result(
            event,
            rnd=self.round,
            phase=self.phase,
            current=self.current,
            rules=self.rules,
            first_num_examples=record.first_num_examples,
            reference_norm=self.reference_norm,
        )
        if rejection is not None:
            record.rejected += 1
            return [Reject(event.datasite, rejection[0], rejection[1], event.payload)]
        # A counted result proves the datasite is alive even if its heartbeat lags;
        # a stale file found by a rescan proves nothing.
        record.last_seen = max(record.last_seen or event.now, event.now)
        current = self.current
        assert current is not None
        elapsed = max(0.0, event.now - current.dispatched_at)
        actions: list[Action] = []
        if event.ok:
            current.succeeded[event.datasite] = elapsed
            current.num_examples[event.datasite] = event.num_examples
            current.metrics[event.datasite] = dict(event.metrics)
            record.succeeded += 1
            record.train_seconds_total += elapsed
            if event.runner_seconds is not None:
                record.runner_train_seconds_total += event.runner_seconds
                record.runner_timed += 1
            if record.first_num_examples is None:
                record.first_num_examples = event.num_examples
            if event.update_norm is not None:
                current.update_norms[event.datasite] = event.update_norm
            actions.append(
                Accept(current.round, current.attempt, event.datasite, event.num_examples, event.payload)
            )
        else:
            error_type = event.error_type or "Error"
            current.failed[event.datasite] = error_type
            record.failed += 1
            actions.append(
                RecordFailure(current.round, event.datasite, error_type, event.error_message or "")
            )
        outstanding = current.outstanding_count()  # per result: O(1), not a set of N
        if not outstanding or len(current.succeeded) + outstanding < self.rules.min_train_nodes:
            actions.extend(self._close(event.now))
        return actions

    def _on_tick(self, now: float) -> list[Action]:
        if self.phase == Phase.WAITING_FOR_NODES:
            actions = self._try_dispatch(now)
            still_waiting = self.phase == Phase.WAITING_FOR_NODES
            if still_waiting and self.wait_until is not None and now >= self.wait_until:
                available = self.available(now)
                present = set(available)
                missing = [d for d in self.rules.datasites if d not in present]
                return self._fail_round(
                    f"only {len(available)} of {self.rules.min_available_nodes} needed datasites"
                    f" were seen within {self.rules.available_timeout_seconds:g} s before round"
                    f" {self.round}; missing: {', '.join(missing)}",
                    now,
                )
            return actions
        if self.phase == Phase.TRAINING and self.current and now >= self.current.deadline:
            return self._close(now)
        if self.phase == Phase.EVALUATING and self.evaluation and now >= self.evaluation.deadline:
            return self._finish_evaluation(now)
        return []

    def _open_attempt(self) -> Attempt:
        assert self.current is not None, "only while an attempt is open"
        return self.current

    def _close(self, now: float) -> list[Action]:
        summary = self._open_attempt().summary(now)
        for d in summary.timed_out:
            self.records[d].timed_out += 1
            if self.rules.timeout_means_gone:
                self.records[d].last_seen = None
        if len(summary.succeeded) >= self.rules.min_train_nodes:
            self.phase = Phase.AGGREGATING
            for d, norm in self._open_attempt().update_norms.items():
                self.records[d].last_update_norm = norm  # the next rounds' outlier reference
            return [Aggregate(summary)]
        reason = (
            f"round {self.round} attempt {summary.attempt}: {len(summary.succeeded)} of"
            f" {self.rules.min_train_nodes} needed results"
        )
        self.current = None
        if summary.attempt > self.rules.max_round_retries:
            actions: list[Action] = [AbandonAttempt(summary, reason, retry=False)]
            actions.extend(
                self._fail_round(f"{reason}; no retries left ({self.rules.max_round_retries})", now)
            )
            return actions
        if self.pacing is not None and self.pacing.too_late(now):
            actions = [AbandonAttempt(summary, reason, retry=False)]
            actions.extend(self._fail_round(f"{reason}; no time left before the root's deadline", now))
            return actions
        actions = [AbandonAttempt(summary, reason, retry=True)]
        actions.extend(self._enter_waiting(now))
        return actions

    def _on_aggregated(self, event: RoundAggregated) -> list[Action]:
        if self.phase != Phase.AGGREGATING or event.round != self.round:
            return []
        self.current = None
        if self.rules.fraction_evaluate > 0:
            evaluation = start_evaluation(
                run_id=self.rules.run_id,
                rnd=self.round,
                available=self.available(event.now),
                fraction=self.rules.fraction_evaluate,
                minimum=self.rules.min_evaluate_nodes,
                seed=self.rules.selection_seed,
                now=event.now,
                timeout_seconds=self.rules.round_timeout_seconds,
            )
            if evaluation is not None:
                self.evaluation = evaluation
                self.phase = Phase.EVALUATING
                return [
                    Dispatch(
                        self.round,
                        EVALUATION_ATTEMPT,
                        dict(evaluation.tasks),
                        evaluation.deadline,
                        event.now,
                        purpose="evaluate",
                    )
                ]
            skipped = EvaluationSkipped(
                self.round,
                f"fewer than min_evaluate_nodes ({self.rules.min_evaluate_nodes}) datasites present",
            )
            return [skipped, *self._next_round(event.now)]
        return self._next_round(event.now)

    def _on_evaluation_result(self, event: ResultReceived, record: DatasiteRecord) -> list[Action]:
        evaluation = self.evaluation
        if self.phase != Phase.EVALUATING or evaluation is None or event.round != evaluation.round:
            record.rejected += 1
            reason = Reason.ROUND_CLOSED if event.round <= self.round else Reason.UNKNOWN_ROUND
            return [
                Reject(event.datasite, reason, f"no evaluation of round {event.round} is open", event.payload)
            ]
        rejection = evaluation.check(event)
        if rejection is not None:
            record.rejected += 1
            return [Reject(event.datasite, rejection[0], rejection[1], event.payload)]
        evaluation.record(event)
        if not evaluation.outstanding_count():
            return self._finish_evaluation(event.now)
        return []

    def _finish_evaluation(self, now: float) -> list[Action]:
        evaluation = self.evaluation
        assert evaluation is not None
        self.evaluation = None
        done = evaluation.summary(now, weighted_metrics(evaluation.metrics, evaluation.num_examples))
        return [done, *self._next_round(now)]

    def _next_round(self, now: float) -> list[Action]:
        self.round += 1
        self.attempt_number = 0
        # A region ends when its root does (RootEnded), however many rounds it has run: ending
        # on its own count could cut off the answer to the root's last round.
        if self.round > self.rules.num_rounds and self.pacing is None:
            self.phase = Phase.DONE
            return [JobFinished(self.rules.num_rounds)]
        return self._enter_waiting(now)

    def _fail_round(self, reason: str, now: float) -> list[Action]:
        """A round that cannot be finished: the job fails, or a region tells its root and goes on."""
        if self.pacing is None:
            return self._fail(reason)
        self.current = None
        return [RootRoundFailed(self.round, reason), *self._next_round(now)]

    def _fail(self, reason: str) -> list[Action]:
        self.phase = Phase.FAILED
        self.current = None
        return [JobFailed(reason)]
