"""The round loop: events into the machine, its actions carried out, in order.

Before an action has effects, whatever it decided that cannot be recomputed is
appended to the round log, so kill -9 at any point resumes the same round with
the same results counted once. The driver never sets the machine's state: it
feeds events and carries out the actions they return.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import ObjectReceiveStream

from fl_orchestrator.config.schema import JobConfig
from fl_orchestrator.core import events as ev
from fl_orchestrator.core.machine import Phase, RoundMachine
from fl_orchestrator.daemon.action_log import WaitingLog, log_action, log_round_completed
from fl_orchestrator.daemon.recording import records_for
from fl_orchestrator.daemon.reports import Reports
from fl_orchestrator.daemon.root_link import RootLink, regions_of, sum_tier_counts
from fl_orchestrator.daemon.round_work import HookFailed, RoundWork
from fl_orchestrator.daemon.sdnotify import SystemdNotifier
from fl_orchestrator.intake.loop import IntakeLoop
from fl_orchestrator.intake.quarantine import Quarantine
from fl_orchestrator.storage import failpoints
from fl_orchestrator.storage.checkpoints import Checkpoint
from fl_orchestrator.storage.job_state import JobState
from fl_orchestrator.storage.kept import KeptResults
from fl_orchestrator.storage.retry import StateWriteError
from fl_orchestrator.storage.round_log import DispatchRecord

log = structlog.get_logger("fl_orchestrator.daemon")

EXIT_DONE = 0
# Outside transitions, status.json is rewritten at most this often.
STATUS_PACE_SECONDS = 5.0
EXIT_JOB_FAILED = 1
STATE_OF_PHASE = {Phase.DONE: "done", Phase.FAILED: "failed"}


class RoundDriver:
    """Feeds the round machine and carries out its actions; owns the job's exit code."""

    def __init__(
        self,
        config: JobConfig,
        *,
        work: RoundWork,
        state: JobState,
        reports: Reports,
        quarantine: Quarantine,
        kept: KeptResults,
        notifier: SystemdNotifier,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.work = work
        self.state = state
        self.reports = reports
        self.quarantine = quarantine
        self.kept = kept
        self.notifier = notifier
        self.clock = clock
        self.machine: RoundMachine | None = None
        self.intake: IntakeLoop | None = None
        self.exit_code: int | None = None
        self.failure_reason: str | None = None
        self.final_model_path: Path | None = None
        # While replaying a round log after a restart, decisions are not logged again
        # and nothing is dispatched or refused a second time.
        self.replaying = False
        self.pending_aggregate: ev.RoundSummary | None = None
        self.status_wanted = anyio.Event()
        self.status_written_at = -math.inf  # time.monotonic() of the last status.json write
        self.status_soon = anyio.Event()
        self.waiting_log = WaitingLog()
        self.status_urgent = anyio.Event()
        # Kept links of rounds up to this one are no longer needed; removed by prune_kept_when_wanted.
        self.prune_through = 0
        self.prune_wanted = anyio.Event()
        # Set when this daemon is a region of a root job (docs/TIERS.md).
        self.root_link: RootLink | None = None
        # A root's regions: their own counts in the last round they answered (status.json).
        self.regions: dict[str, dict[str, int | float]] = {}

    # ---- the loop --------------------------------------------------------------------

    async def run(self, events: ObjectReceiveStream[ev.Event]) -> int:
        """Feed events (and timer ticks) to the machine until the job ends; return the exit code."""
        machine = self.machine
        assert machine is not None
        if self.pending_aggregate is not None:
            summary, self.pending_aggregate = self.pending_aggregate, None
            # Its RoundAggregated moves the machine on: without it the job would hang.
            for follow_up in await self.execute(ev.Aggregate(summary)):
                await self.feed(follow_up)
        await self.feed(ev.Started(self.clock()))
        while self.exit_code is None:
            wake = machine.next_wakeup()
            timeout = math.inf if wake is None else max(0.0, wake - self.clock())
            event: ev.Event | None = None
            with anyio.move_on_after(timeout):
                event = await events.receive()
            await self.feed(event if event is not None else ev.Tick(self.clock()))
            if isinstance(event, ev.ResultReceived) and self.intake is not None:
                self.intake.result_done()  # folded (or refused): the intake may read the next one
        return self.exit_code

    async def feed(self, event: ev.Event) -> None:
        """One event: log what it decided, then carry out its actions (and theirs)."""
        machine = self.machine
        assert machine is not None
        before = (machine.phase, machine.round)
        rnd = machine.round
        actions = machine.handle(event)
        if not self.replaying:
            await self._log_decisions(rnd, event, actions)
        for action in actions:
            for follow_up in await self.execute(action):
                await self.feed(follow_up)
        if isinstance(event, ev.ResultReceived) and not self.replaying:
            # Counted (and kept) or refused, and logged: the protocol may clean up after it.
            await anyio.to_thread.run_sync(self.work.wire.decided, event.payload)
        if isinstance(event, ev.RoundAggregated) and self.prune_through:
            self.prune_wanted.set()  # the next round is dispatched by now: prune beside it, not before
        if machine.round != rnd:
            structlog.contextvars.bind_contextvars(round=machine.round)
        if self.replaying:
            return
        transition = (machine.phase, machine.round) != before
        if transition:
            self.status_wanted.set()
            self.status_urgent.set()
        elif actions or isinstance(event, ev.NodeSeen | ev.NodesSeen):
            self.status_soon.set()  # results, refusals, "last seen": refresh_status_soon
        if transition:
            self.notifier.status(self.status_line())

    async def _log_decisions(self, rnd: int, event: ev.Event, actions: list[ev.Action]) -> None:
        """Append what this event decided to the round log, before any of it takes effect."""
        attempt = self.machine.attempt_number if self.machine else 0
        for record_round, record in records_for(rnd, attempt, event, actions):
            await self.state.append(record_round, record)
            if isinstance(record, DispatchRecord):
                failpoints.hit("dispatch.after_log")

    async def execute(self, action: ev.Action) -> list[ev.Event]:
        """Carry out one action; return the events it produced."""
        if isinstance(action, ev.Dispatch):
            if action.purpose == "train":
                structlog.contextvars.bind_contextvars(attempt=action.attempt)
            if not self.replaying:
                if action.purpose == "train":
                    self.take_root_model(action.round)
                try:
                    await self.work.dispatch(action)
                except HookFailed as exc:
                    return [ev.Aborted(self.clock(), str(exc))]
        elif isinstance(action, ev.Accept):
            await self.work.fold(action)
            self.quarantine.counted(action.datasite)
        elif isinstance(action, ev.Reject):
            if self.intake is not None and not self.replaying:
                await self.intake.refuse(action.payload.path, action.datasite, action.reason, action.detail)
        elif isinstance(action, (ev.RecordFailure, ev.AbandonAttempt)) or (
            isinstance(action, ev.AwaitNodes) and not self.replaying
        ):
            if isinstance(action, ev.RecordFailure):
                self.quarantine.counted(action.datasite)  # a well-formed answer ends a refusal streak
            log_action(action, self.clock, self.waiting_log)
        elif isinstance(action, ev.Aggregate):
            if self.replaying:
                self.pending_aggregate = action.summary
                return []
            return await self.aggregate(action.summary)
        elif isinstance(action, ev.AwaitRoot):
            log.info("region.waiting_for_root", round=action.round)
        elif isinstance(action, ev.RootRoundFailed):
            log.warning("region.round_failed", round=action.round, reason=action.reason)
            if self.root_link is not None:
                self.root_link.failed(action.round, action.reason)
        elif isinstance(action, (ev.EvaluationDone, ev.EvaluationSkipped)):
            await self._record_evaluation(action)
        elif isinstance(action, ev.JobFinished):
            await self.state.finish("done")
            self.exit_code = EXIT_DONE
            log.info(
                "job.finished",
                rounds=action.rounds,
                final_model=str(self.final_model_path or self.work.store.path_for(action.rounds)),
                evaluate_metrics=self.work.last_evaluate,
            )
        elif isinstance(action, ev.JobFailed):
            self.failure_reason = action.reason
            await self.state.finish("failed", action.reason)
            self.exit_code = EXIT_JOB_FAILED
            log.error("job.failed", reason=action.reason)
        return []

    # ---- effects that take more than a line ------------------------------------------

    async def _record_evaluation(self, action: ev.EvaluationDone | ev.EvaluationSkipped) -> None:
        if isinstance(action, ev.EvaluationSkipped):
            log.warning("evaluation.skipped", round=action.round, reason=action.reason)
            return
        line = {
            "round": action.round,
            "selected": list(action.selected),
            "succeeded": list(action.succeeded),
            "failed": action.failed,
            "timed_out": list(action.timed_out),
            "num_examples": action.num_examples,
            "metrics": action.metrics,
            "seconds": round(action.seconds, 6),
        }
        self.work.previous_metrics["federated_evaluate"] = dict(action.metrics)
        await self.state.durably(
            lambda: self.reports.append_evaluation(line),
            what="evaluations line",
            path=self.reports.evaluations_path,
        )
        log.info("evaluation.completed", phase="evaluate", **line)

    async def aggregate(self, summary: ev.RoundSummary) -> list[ev.Event]:
        """Finish the round: model, metrics line, checkpoint (the commit point); then move on."""
        machine = self.machine
        assert machine is not None
        try:
            path, aggregate_seconds = await self.work.aggregate(summary)
        except StateWriteError:
            raise  # storage, not the round: exit 74 and resume on restart
        except Exception as exc:  # a failed aggregation ends the job with its reason
            log.exception("round.aggregation_failed", round=summary.round)
            return [ev.AggregationFailed(self.clock(), summary.round, f"{type(exc).__name__}: {exc}")]
        self.final_model_path = path
        if self.intake is not None:
            # The next round's results are measured against the model it will be sent.
            self.intake.reader.set_global_model(self.work.global_model, summary.round + 1)
        summary = self.work.aggregate_metrics(summary)
        if self.config.job.role == "root":
            self.regions.update(regions_of(summary))
            summary = sum_tier_counts(summary)
        evaluate = await self.work.evaluate(summary.round)
        line = await self.state.durably(
            lambda: self.reports.append_round(
                summary, evaluate=evaluate, aggregate_seconds=aggregate_seconds, model_path=path
            ),
            what="metrics line",
            path=self.reports.metrics_path,
        )
        self.work.previous_metrics = previous_metrics_of(line)
        assert self.state.run is not None
        checkpoint = Checkpoint(
            summary.round,
            self.state.run.run_id,
            self.work.global_model,
            self.work.strategy.state_dict(),
            machine.records_snapshot(),
        )
        link = self.root_link
        if link is not None:
            # Before the checkpoint: a restart that aggregates this round again gets the same model.
            await self.state.durably(
                functools.partial(link.record, summary, self.work.global_model),
                what="region answer",
                path=link.answer_path(summary.round),
            )
        await self.state.save_checkpoint(checkpoint)
        if link is not None:
            link.completed(summary.round)
        # A corrupt newest checkpoint falls back to the oldest one kept: keep what replays need.
        # The rest goes after the next dispatch (prune_kept_when_wanted): removing a round's links
        # takes 0.5-0.9 s at 1,000 datasites, and the next round needs none of it.
        oldest_kept = summary.round - self.config.state.keep_checkpoints + 1
        self.prune_through = max(self.prune_through, oldest_kept)
        log_round_completed(
            summary,
            evaluate=evaluate,
            collect_seconds=line["collect_seconds"],
            aggregate_seconds=aggregate_seconds,
            model=str(path),
        )
        return [ev.RoundAggregated(self.clock(), summary.round)]

    def take_root_model(self, rnd: int) -> None:
        """A region's round dispatches the model and config its root sent for that round."""
        offered = None if self.root_link is None else self.root_link.offered.get(rnd)
        if offered is None:
            return
        arrays, config, _ = offered
        self.work.global_model = arrays
        self.work.root_config = config
        if self.intake is not None:
            self.intake.reader.set_global_model(arrays, rnd)

    # ---- status ----------------------------------------------------------------------

    def status_line(self) -> str:
        """One line for systemd's STATUS=."""
        if self.machine is None:
            return "starting"
        total = self.config.job.num_rounds
        return f"{self.config.job.name}: round {min(self.machine.round, total)}/{total} {self.machine.phase}"

    def status_document(self, state: str | None = None) -> dict[str, Any]:
        """A snapshot for status.json; ``state`` defaults to what the machine's phase says."""
        assert self.machine is not None
        extra: dict[str, Any] = {
            "quarantined": self.quarantine.snapshot_counts(),
            "flagged": self.quarantine.flagged_datasites(),
            "quarantine_dropped": self.quarantine.snapshot_dropped(),
            "last_evaluate": dict(self.work.last_evaluate),
            "bytes_written_total": self.work.bytes_written_total,
        }
        if self.config.job.role != "flat":
            extra["tier"] = self.config.job.role
        if self.regions:
            extra["regions"] = {name: dict(counts) for name, counts in sorted(self.regions.items())}
        if self.failure_reason:
            extra["error"] = self.failure_reason
        shown = state or STATE_OF_PHASE.get(self.machine.phase, "running")
        return self.reports.status_document(self.machine, now=self.clock(), state=shown, extra=extra)

    def want_status(self) -> None:
        """Something status.json shows changed outside the round loop (a refusal, say)."""
        self.status_soon.set()

    async def refresh_status_soon(self) -> None:
        """Results, refusals and heartbeats: status.json follows, at most every STATUS_PACE_SECONDS.

        A change waits for the rest of that span, so it shows late but always shows; a
        transition rewrites the file at once. The file is O(datasites): at 1,000 of them
        building and writing it holds the interpreter for tens of milliseconds, which every
        result arriving meanwhile waits for (the detection benchmark's p99).
        """
        while True:
            await self.status_soon.wait()
            self.status_soon = anyio.Event()
            wait = self.status_written_at + STATUS_PACE_SECONDS - time.monotonic()
            if wait > 0:
                await anyio.sleep(wait)
            self.status_wanted.set()

    async def prune_kept_when_wanted(self) -> None:
        """Remove the kept links no checkpoint replay needs, in a worker thread, off the round's path.

        Woken once the round after the aggregate is dispatched. A stop waits for a removal under
        way; one a kill cuts short is finished by the next start (startup prunes through its
        checkpoint's round).
        """
        while True:
            await self.prune_wanted.wait()
            self.prune_wanted = anyio.Event()
            await anyio.to_thread.run_sync(self.kept.prune, self.prune_through)

    async def write_status_when_wanted(self) -> None:
        """Rewrite status.json when wanted: at once on a transition, else paced by refresh_status_soon.

        Off the round loop: with a thousand datasites the file takes tens of
        milliseconds to write, which would delay the next result.
        """
        while True:
            await self.status_wanted.wait()
            self.status_wanted = anyio.Event()
            self.status_written_at = time.monotonic()
            self.status_urgent = anyio.Event()
            document = self.status_document()
            await self.state.durably(
                functools.partial(self.reports.write_status_document, document),
                what="status",
                path=self.reports.status_path,
            )
            with anyio.move_on_after(1.0):
                await self.status_urgent.wait()

    async def write_last_status(self, state: str | None = None) -> None:
        """The last status of a run that is ending: one try, since run.json already holds the outcome."""
        document = self.status_document(state)
        try:
            await anyio.to_thread.run_sync(
                functools.partial(self.reports.write_status_document, document, final=True)
            )
        except OSError as exc:
            log.error("status.write_failed", path=str(self.reports.status_path), error=exc.strerror)


def previous_metrics_of(line: dict[str, Any]) -> dict[str, Any]:
    """What configure_round receives about the round before: from its metrics line."""
    return {
        "round": line.get("round"),
        "train": dict(line.get("train_metrics") or {}),
        "evaluate": dict(line.get("evaluate_metrics") or {}),
    }
