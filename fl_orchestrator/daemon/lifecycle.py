"""The async shell: wires watchfiles, timers and file writes to the round machine.

One task group is the root. Its children are the watcher (paths), the intake
(paths -> decoded events, in worker threads) and the round loop (events ->
machine -> actions). Before an action has effects, whatever it decided that
cannot be recomputed is appended to the round log, so kill -9 at any point
resumes the same round with the same results counted once.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import ObjectReceiveStream

from fl_orchestrator.aggregation.base import Strategy
from fl_orchestrator.aggregation.registry import build_strategy
from fl_orchestrator.config.hooks import load_callable
from fl_orchestrator.config.render import config_to_toml
from fl_orchestrator.config.schema import JobConfig
from fl_orchestrator.core import events as ev
from fl_orchestrator.core.machine import Phase, RoundMachine, RoundRules
from fl_orchestrator.daemon.action_log import log_action, log_round_completed
from fl_orchestrator.daemon.recording import event_for_record, records_for
from fl_orchestrator.daemon.reports import Reports
from fl_orchestrator.daemon.round_work import HookFailed, RoundWork
from fl_orchestrator.daemon.sdnotify import SystemdNotifier
from fl_orchestrator.intake.loop import IntakeLoop
from fl_orchestrator.intake.quarantine import Quarantine
from fl_orchestrator.intake.reader import FileIdentity, InboundReader
from fl_orchestrator.intake.recovery import recover_counted
from fl_orchestrator.intake.watcher import PathBatch, watch_job_files
from fl_orchestrator.protocols.native import Publisher
from fl_orchestrator.storage import failpoints
from fl_orchestrator.storage.atomic import atomic_write_text, remove_own_temps
from fl_orchestrator.storage.checkpoints import Checkpoint
from fl_orchestrator.storage.job_state import JobState
from fl_orchestrator.storage.jsonl import repair_tail
from fl_orchestrator.storage.kept import KeptResults
from fl_orchestrator.storage.lock import StateLock
from fl_orchestrator.storage.models import ModelStore, initial_model
from fl_orchestrator.storage.retry import StateWriteError
from fl_orchestrator.storage.round_log import DispatchRecord, Record, ResultRecord
from fl_orchestrator.wire.layout import JobLayout
from fl_orchestrator.wire.messages import model_spec

if TYPE_CHECKING:
    from fl_orchestrator.protocols.syft_flwr.bridge import Bridge

log = structlog.get_logger("fl_orchestrator.daemon")

EXIT_DONE = 0
EXIT_JOB_FAILED = 1
EXIT_SOFTWARE = 70
_STATE_OF_PHASE = {Phase.DONE: "done", Phase.FAILED: "failed"}

Clock = Callable[[], float]


def rules_from_config(config: JobConfig, run_id: str) -> RoundRules:
    """The machine's view of the job config."""
    job, box = config.job, config.syftbox
    return RoundRules(
        run_id=run_id,
        datasites=box.datasites,
        num_rounds=job.num_rounds,
        round_timeout_seconds=job.round_timeout_seconds,
        fraction_train=job.fraction_train,
        min_train_nodes=job.min_train_nodes,
        min_available_nodes=job.min_available_nodes,
        available_timeout_seconds=job.available_timeout_seconds,
        max_round_retries=job.max_round_retries,
        presence_ttl_seconds=box.presence_ttl_seconds,
        selection_seed=job.selection_seed,
        fraction_evaluate=job.fraction_evaluate,
        min_evaluate_nodes=job.min_evaluate_nodes,
        timeout_means_gone=job.protocol == "syft-flwr",
    )


class Daemon:
    """One job's aggregation service."""

    def __init__(
        self,
        config: JobConfig,
        *,
        clock: Clock = time.time,
        handle_signals: bool = True,
        notifier: SystemdNotifier | None = None,
        rerun: bool = False,
        stop_requests: list[int] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.handle_signals = handle_signals
        self.notifier = notifier or SystemdNotifier.from_environment({})
        self.rerun = rerun
        # Signals that arrived before the root task group listened (cli/daemon_entry.py).
        self.stop_requests = stop_requests if stop_requests is not None else []
        self.job = config.job.name
        self.lock = StateLock(config.state.state_dir)
        self.state_dir = config.state.state_dir
        self.store = ModelStore(self.state_dir, self.job)
        self.reports = Reports(self.state_dir, self.job)
        self.state = JobState(
            self.state_dir,
            self.job,
            keep_checkpoints=config.state.keep_checkpoints,
            retry_seconds=config.state.write_retry_seconds,
        )
        self.quarantine = Quarantine(
            self.state_dir / "quarantine",
            flag_after=config.limits.flag_after_rejections,
            keep_originals=config.daemon.quarantine_mode == "copy",
            retry=self.state.retry,
        )
        # With syft-flwr the native pipeline runs on a private spool; the bridge translates.
        self.bridge: Bridge | None = None
        publisher: Publisher
        if config.job.protocol == "syft-flwr":
            from fl_orchestrator.protocols.syft_flwr.transport import SyftFlwrTransport

            self.layout = JobLayout(self.state_dir / "spool", self.job, config.syftbox.aggregator_email)
            transport = SyftFlwrTransport(config, self.layout, self.quarantine, clock)
            publisher, self.bridge = transport.publisher, transport.bridge
        else:
            self.layout = JobLayout(config.syftbox.root, self.job, config.syftbox.aggregator_email)
            publisher = Publisher(self.layout, config.syftbox.datasites, config.syftbox.part_bytes)
        self.kept = KeptResults(self.state_dir, self.layout.datasites_dir)
        evaluate = configure_round = metrics_aggregation = None
        if config.evaluate.global_evaluate:
            evaluate = load_callable(config.evaluate.global_evaluate, what="evaluate.global_evaluate")
        if config.job.configure_round:
            configure_round = load_callable(config.job.configure_round, what="job.configure_round")
        if config.job.metrics_aggregation:
            metrics_aggregation = load_callable(
                config.job.metrics_aggregation, what="job.metrics_aggregation"
            )
        self.work = RoundWork(
            config,
            publisher=publisher,
            store=self.store,
            strategy=build_strategy(
                config.strategy.name, dict(config.strategy.params), seed=config.job.selection_seed
            ),
            evaluate=evaluate,
            clock=clock,
            retry=self.state.retry,
            kept=self.kept,
            configure_round=configure_round,
            metrics_aggregation=metrics_aggregation,
        )
        self.machine: RoundMachine | None = None
        self.intake: IntakeLoop | None = None
        self.exit_code: int | None = None
        self.final_model_path: Path | None = None
        self.failure_reason: str | None = None
        self.replaying = False
        self.status_wanted: anyio.Event | None = None
        self.status_urgent: anyio.Event | None = None
        self.pending_aggregate: ev.RoundSummary | None = None

    @property
    def strategy(self) -> Strategy:
        """The job's aggregation strategy."""
        return self.work.strategy

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self) -> int:
        """Run the job to its end; return the process exit code.

        Raises LockHeld if another daemon runs this state folder, and
        StateWriteError (possibly inside an exception group) if a state write
        still failed after ``state.write_retry_seconds``.
        """
        self.lock.acquire()
        try:
            return await self._run()
        finally:
            self.lock.release()

    async def _run(self) -> int:
        complete = await anyio.to_thread.run_sync(self._prepare)
        # Everything allocated so far lives for the whole run: keep the collector
        # from scanning it again in every full collection (20 ms pauses measured).
        gc.freeze()
        if complete:
            assert self.state.run is not None
            if self.bridge is not None:
                # Killed after the job ended but before the stop went out: send it now.
                reason = self.state.run.reason or "job complete"
                owners = self.config.syftbox.datasites
                try:
                    await anyio.to_thread.run_sync(self.bridge.publisher.send_stop, owners, reason)
                except OSError as exc:  # best effort: the job's outcome is already settled
                    log.warning("syft_flwr.stop_not_sent", job=self.job, error=str(exc))
            return EXIT_DONE if self.state.run.status == "done" else EXIT_JOB_FAILED
        machine = self.machine
        assert machine is not None
        reader = InboundReader(
            self.layout,
            frozenset(self.config.syftbox.datasites),
            model_spec(self.work.global_model),
            self.config.limits,
            global_model=self.work.global_model,
            global_model_round=machine.round,
        )
        # Whole-set strategies re-map counted results: they get the same norm bound.
        self.intake = IntakeLoop(
            self.layout,
            reader,
            self.quarantine,
            self.clock,
            settle_seconds=self.config.daemon.partial_file_settle_seconds,
        )
        await self._resume()
        batches_send, batches_recv = anyio.create_memory_object_stream[PathBatch](16)
        # Small buffer: each queued result holds a decoded model, so back-pressure
        # on intake is what keeps memory flat.
        events_send, events_recv = anyio.create_memory_object_stream[ev.Event](0)
        async with anyio.create_task_group() as root:
            if self.handle_signals:
                root.start_soon(self._watch_signals, root.cancel_scope)
            root.start_soon(
                lambda: watch_job_files(
                    self.layout,
                    self.config.syftbox.datasites,
                    batches_send,
                    debounce_milliseconds=self.config.daemon.watch_debounce_milliseconds,
                    rescan_interval_seconds=self.config.daemon.rescan_interval_seconds,
                )
            )
            root.start_soon(self.intake.run, batches_recv, events_send)
            if self.bridge is not None:
                root.start_soon(self.bridge.run)
            self.status_wanted = anyio.Event()
            self.status_urgent = anyio.Event()
            root.start_soon(self._write_status_when_wanted)
            interval = self.notifier.watchdog_interval_seconds()
            if interval is not None:
                root.start_soon(self._ping_watchdog, interval)
            self.notifier.ready(self._status_line())
            self.exit_code = await self._round_loop(events_recv)
            if self.bridge is not None and self.exit_code is not None:
                # The job ended (done or failed): tell syft-flwr's owners to exit, as its server does.
                reason = self.failure_reason or "job complete"
                await self.bridge.finish(reason, wait_seconds=self.config.syft_flwr.stop_wait_seconds)
            final = self._status_document(_STATE_OF_PHASE.get(machine.phase, "running"))
            await anyio.to_thread.run_sync(self._write_status_document, final)
            root.cancel_scope.cancel()
        self.notifier.stopping(self._status_line())
        self.state.close()
        if self.exit_code is None:  # cancelled by a signal: state is already durable
            self.exit_code = EXIT_DONE
            with anyio.move_on_after(self.config.daemon.shutdown_timeout_seconds, shield=True):
                stopped = self._status_document("stopped")
                await anyio.to_thread.run_sync(self._write_status_document, stopped)
            log.info("daemon.stopped", job=self.job, round=machine.round, phase=str(machine.phase))
        return self.exit_code

    def _prepare(self) -> bool:
        start = self.state.start(rerun=self.rerun)
        if start.complete:
            self.failure_reason = start.run.reason
            (log.info if start.run.status == "done" else log.error)(
                "job.already_complete" if start.run.status == "done" else "job.already_failed",
                job=self.job,
                run_id=start.run.run_id,
                finished=start.run.finished,
                reason=start.run.reason,
                hint="start with --rerun to run it again; this run's outputs are archived, not overwritten",
            )
            return True
        if self.bridge is not None:
            self.bridge.publisher.set_run(start.run.run_id)
        durably = self.state.retry.run_blocking
        # A kill -9 mid-write leaves our temp files in the synced folders too, where
        # every datasite's client would sync them.
        for leftover in remove_own_temps(self.layout.aggregator_dir, recursive=True):
            log.info("syftbox.leftover_removed", path=str(leftover))
        for jsonl in (self.reports.metrics_path, self.reports.evaluations_path):
            durably(functools.partial(repair_tail, jsonl), what="torn last line", path=jsonl)
        aggregator_dir = self.layout.aggregator_dir
        durably(lambda: aggregator_dir.mkdir(parents=True, exist_ok=True), what="folder", path=aggregator_dir)
        durably(self.work.publisher.write_permissions, what="permissions", path=aggregator_dir)
        # Beside the state it produced, so the run can be reproduced exactly.
        effective = self.state_dir / "effective-config.toml"
        config_text = config_to_toml(self.config)
        durably(lambda: atomic_write_text(effective, config_text), what="config", path=effective)
        machine = RoundMachine(rules_from_config(self.config, start.run.run_id))
        if start.checkpoint is None:
            model = self.work.global_model = initial_model(self.config.model)
            durably(lambda: self.store.save(0, model), what="global model", path=self.store.path_for(0))
            self.work.evaluate_sync(0)
            first = Checkpoint(0, start.run.run_id, model, self.strategy.state_dict(), {})
            durably(
                lambda: self.state.checkpoints.save(first),
                what="checkpoint",
                path=self.state.checkpoints.path_for(0),
            )
            completed = 0
        else:
            completed = start.checkpoint.round
            self.kept.prune(completed)
            self.work.global_model = start.checkpoint.model
            self.strategy.load_state_dict(start.checkpoint.strategy_state)
            machine.restore_records(start.checkpoint.records)
            machine.round = completed + 1
            lines = self.reports.round_lines()
            if lines and lines[-1].get("round") == completed:
                self.work.previous_metrics = previous_metrics_of(lines[-1])
                evaluations = self.reports.evaluation_lines()
                if evaluations and evaluations[-1].get("round") == completed:
                    self.work.previous_metrics["federated_evaluate"] = dict(evaluations[-1]["metrics"])
        self.machine = machine
        failpoints.hit("start.done")
        log.info(
            "job.started" if start.checkpoint is None else "job.resumed",
            job=self.job,
            run_id=start.run.run_id,
            completed_round=completed,
            num_rounds=self.config.job.num_rounds,
            datasites=len(self.config.syftbox.datasites),
            parameters=sum(a.size for a in self.work.global_model.values()),
            model_bytes=sum(a.nbytes for a in self.work.global_model.values()),
            state_dir=str(self.state_dir),
        )
        return False

    async def _resume(self) -> None:
        """Replay the open round's log, refolding what was counted before a crash.

        After a checkpoint fallback the round replayed may have closed, and the
        next one may already be out: its aggregate is finished here and the
        next round's logged attempt entered, never dispatched a second time.
        """
        machine, intake = self.machine, self.intake
        assert machine is not None and intake is not None
        for earlier in await anyio.to_thread.run_sync(self.state.accepted_paths, machine.round - 1):
            intake.seen[Path(earlier.path)] = FileIdentity(*earlier.identity)
        self.replaying = True
        try:
            replayed = False
            while records := await anyio.to_thread.run_sync(self.state.records_of, machine.round):
                replayed = True
                await self._replay(records)
                later = await anyio.to_thread.run_sync(self.state.records_of, machine.round + 1)
                if self.pending_aggregate is None or not later:
                    break
                summary, self.pending_aggregate = self.pending_aggregate, None
                log.info("round.replayed_past_checkpoint", job=self.job, round=summary.round)
                for follow_up in await self._aggregate(summary):
                    await self._feed(follow_up)
        finally:
            self.replaying = False
        if not replayed:
            return
        current = machine.current
        log.info(
            "round.resumed",
            job=self.job,
            round=machine.round,
            phase=str(machine.phase),
            attempt=current.attempt if current else None,
            counted=sorted(current.answered()) if current else [],
            deadline_in_seconds=round(current.deadline - self.clock(), 3) if current else None,
        )
        if machine.phase == Phase.TRAINING and current is not None:
            if self.config.daemon.restart_grants_fresh_timeout:
                current.deadline = self.clock() + self.config.job.round_timeout_seconds
            # Tasks and the model may not all have been written before the crash.
            redo = ev.Dispatch(
                current.round, current.attempt, current.tasks, current.deadline, current.dispatched_at
            )
            await self.work.dispatch(redo, begin=False)

    async def _replay(self, records: list[Record]) -> None:
        """Feed one round's logged decisions back into the machine."""
        machine, intake = self.machine, self.intake
        assert machine is not None and intake is not None
        for record in records:
            if isinstance(record, DispatchRecord):
                machine.replay_dispatch(record.attempt, record.tasks, record.dispatched_at, record.deadline)
                self.strategy.begin_round(machine.round, self.work.global_model)
                self.work.accepted_files = []
                continue
            message = None
            if isinstance(record, ResultRecord) and record.ok:
                reader = intake.reader
                outcome = await anyio.to_thread.run_sync(
                    recover_counted, reader, self.kept, machine.round, record
                )
                if isinstance(outcome, str):
                    # Not counted after all: its datasite may answer again before the deadline.
                    log.warning(
                        "result.recollect",
                        job=self.job,
                        round=machine.round,
                        datasite=record.datasite,
                        reason="counted result gone or changed since it was counted",
                        detail=outcome,
                    )
                    continue
                message = outcome
            if isinstance(record, ResultRecord):
                intake.seen[Path(record.path)] = FileIdentity(*record.identity)
            await self._feed(event_for_record(record, machine.round, message))

    async def _ping_watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself, so a loop that stops turning stops the pings.
        while True:
            self.notifier.watchdog()
            await anyio.sleep(interval)

    def _status_line(self) -> str:
        if self.machine is None:
            return "starting"
        shown = min(self.machine.round, self.config.job.num_rounds)
        return f"{self.job}: round {shown}/{self.config.job.num_rounds} {self.machine.phase}"

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        stopping = False
        try:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                if self.stop_requests:  # arrived while starting: stop now, exactly as for a live one
                    log.info("daemon.stopping", signal=signal.Signals(self.stop_requests[0]).name)
                    stopping = True
                    scope.cancel()
                async for signum in signals:
                    log.info("daemon.stopping", signal=signal.Signals(signum).name)
                    stopping = True
                    scope.cancel()
        finally:
            if stopping:
                # This task is cancelled with the rest, so its receiver is gone: a plain
                # handler makes a second signal end the process at once while we drain.
                for signum in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(signum, _exit_now)

    # ---- the round loop ----------------------------------------------------------------

    async def _round_loop(self, events: ObjectReceiveStream[ev.Event]) -> int:
        machine = self.machine
        assert machine is not None
        if self.pending_aggregate is not None:
            summary, self.pending_aggregate = self.pending_aggregate, None
            # Its RoundAggregated moves the machine on: without it the job would hang.
            for follow_up in await self._execute(ev.Aggregate(summary)):
                await self._feed(follow_up)
        await self._feed(ev.Started(self.clock()))
        while self.exit_code is None:
            wake = machine.next_wakeup()
            timeout = math.inf if wake is None else max(0.0, wake - self.clock())
            event: ev.Event | None = None
            with anyio.move_on_after(timeout):
                event = await events.receive()
            await self._feed(event if event is not None else ev.Tick(self.clock()))
        return self.exit_code

    async def _feed(self, event: ev.Event) -> None:
        machine = self.machine
        assert machine is not None
        before = (machine.phase, machine.round)
        rnd = machine.round
        actions = machine.handle(event)
        if not self.replaying:
            await self._log_decisions(rnd, event, actions)
        for action in actions:
            for follow_up in await self._execute(action):
                await self._feed(follow_up)
        if self.replaying:
            return
        transition = (machine.phase, machine.round) != before
        if (transition or actions) and self.status_wanted is not None:
            self.status_wanted.set()
            if transition and self.status_urgent is not None:
                self.status_urgent.set()
        if transition:
            self.notifier.status(self._status_line())

    async def _write_status_when_wanted(self) -> None:
        """Rewrite status.json on every transition, and after results at most once a second.

        Off the round loop: with a thousand datasites the file takes tens of
        milliseconds to write, which would delay the next result.
        """
        assert self.machine is not None
        while True:
            assert self.status_wanted is not None
            await self.status_wanted.wait()
            self.status_wanted = anyio.Event()
            self.status_urgent = anyio.Event()
            document = self._status_document(_STATE_OF_PHASE.get(self.machine.phase, "running"))
            await self.state.durably(
                functools.partial(self.reports.write_status_document, document),
                what="status",
                path=self.reports.status_path,
            )
            with anyio.move_on_after(1.0):
                await self.status_urgent.wait()

    async def _log_decisions(self, rnd: int, event: ev.Event, actions: list[ev.Action]) -> None:
        """Append what this event decided to the round log, before any of it takes effect."""
        attempt = self.machine.attempt_number if self.machine else 0
        for record_round, record in records_for(rnd, attempt, event, actions):
            await self.state.append(record_round, record)
            if isinstance(record, DispatchRecord):
                failpoints.hit("dispatch.after_log")

    async def _execute(self, action: ev.Action) -> list[ev.Event]:
        if isinstance(action, ev.Dispatch):
            if not self.replaying:
                try:
                    await self.work.dispatch(action)
                except HookFailed as exc:
                    await self._fail_job(str(exc))
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
            log_action(self.job, action, self.clock)
        elif isinstance(action, ev.Aggregate):
            if self.replaying:
                self.pending_aggregate = action.summary
                return []
            return await self._aggregate(action.summary)
        elif isinstance(action, (ev.EvaluationDone, ev.EvaluationSkipped)):
            await self._record_evaluation(action)
        elif isinstance(action, ev.JobFinished):
            await self.state.finish("done")
            self.exit_code = EXIT_DONE
            log.info(
                "job.finished",
                job=self.job,
                rounds=action.rounds,
                final_model=str(self.final_model_path or self.store.path_for(action.rounds)),
                evaluate_metrics=self.work.last_evaluate,
            )
        elif isinstance(action, ev.JobFailed):
            await self._fail_job(action.reason)
        return []

    async def _record_evaluation(self, action: ev.EvaluationDone | ev.EvaluationSkipped) -> None:
        if isinstance(action, ev.EvaluationSkipped):
            log.warning("evaluation.skipped", job=self.job, round=action.round, reason=action.reason)
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
        log.info("evaluation.completed", job=self.job, phase="evaluate", **line)

    async def _fail_job(self, reason: str) -> None:
        if self.machine is not None:
            self.machine.phase = Phase.FAILED  # a hook failure ends the job outside the machine
        self.failure_reason = reason
        await self.state.finish("failed", reason)
        self.exit_code = EXIT_JOB_FAILED
        log.error("job.failed", job=self.job, reason=reason)

    async def _aggregate(self, summary: ev.RoundSummary) -> list[ev.Event]:
        machine = self.machine
        assert machine is not None
        try:
            path, aggregate_seconds = await self.work.aggregate(summary)
        except StateWriteError:
            raise  # storage, not the round: exit 74 and resume on restart
        except Exception as exc:  # a failed aggregation ends the job with its reason
            log.exception("round.aggregation_failed", job=self.job, round=summary.round)
            return [ev.AggregationFailed(self.clock(), summary.round, f"{type(exc).__name__}: {exc}")]
        self.final_model_path = path
        if self.intake is not None:
            # The next round's results are measured against the model it will be sent.
            self.intake.reader.set_global_model(self.work.global_model, summary.round + 1)
        summary = self.work.aggregate_metrics(summary)
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
            self.strategy.state_dict(),
            machine.records_snapshot(),
        )
        await self.state.save_checkpoint(checkpoint)
        # A corrupt newest checkpoint falls back to the oldest one kept: keep what replays need.
        oldest_kept = summary.round - self.config.state.keep_checkpoints + 1
        await anyio.to_thread.run_sync(self.kept.prune, oldest_kept)
        log_round_completed(
            self.job,
            summary,
            evaluate=evaluate,
            collect_seconds=line["collect_seconds"],
            aggregate_seconds=aggregate_seconds,
            model=str(path),
        )
        return [ev.RoundAggregated(self.clock(), summary.round)]

    def _status_document(self, state: str) -> dict[str, Any]:
        assert self.machine is not None
        extra: dict[str, Any] = {
            "quarantined": self.quarantine.snapshot_counts(),
            "flagged": self.quarantine.flagged_datasites(),
            "last_evaluate": dict(self.work.last_evaluate),
        }
        if self.failure_reason:
            extra["error"] = self.failure_reason
        return self.reports.status_document(self.machine, now=self.clock(), state=state, extra=extra)

    def _write_status_document(self, document: dict[str, Any]) -> None:
        """The last status of a run that is ending: one try, since run.json already holds the outcome."""
        try:
            self.reports.write_status_document(document)
        except OSError as exc:
            log.error("status.write_failed", path=str(self.reports.status_path), error=exc.strerror)


def previous_metrics_of(line: dict[str, Any]) -> dict[str, Any]:
    """What configure_round receives about the round before: from its metrics line."""
    return {
        "round": line.get("round"),
        "train": dict(line.get("train_metrics") or {}),
        "evaluate": dict(line.get("evaluate_metrics") or {}),
    }


def _exit_now(signum: int, frame: object) -> None:
    """A second SIGTERM/SIGINT while draining: exit without waiting for anything."""
    os.write(2, f"second signal {signum} while stopping: exiting now\n".encode())
    os._exit(128 + signum)
