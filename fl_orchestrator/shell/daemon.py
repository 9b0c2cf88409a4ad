"""The async shell: wires watchfiles, timers and file writes to the round machine.

One task group is the root. Its children are the watcher (paths), the intake
(paths -> decoded events, in worker threads) and the round loop (events ->
machine -> actions). Heavy numpy work runs in worker threads.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from fl_orchestrator.aggregation.fedavg import make_strategy
from fl_orchestrator.config.schema import JobConfig
from fl_orchestrator.core import events as ev
from fl_orchestrator.core.machine import Phase, RoundMachine, RoundRules
from fl_orchestrator.service.sdnotify import SystemdNotifier
from fl_orchestrator.shell.hooks import load_callable
from fl_orchestrator.shell.intake import FileIdentity, Inbound, InboundReader, Refused
from fl_orchestrator.shell.journal import Journal
from fl_orchestrator.shell.models import ModelStore, initial_model
from fl_orchestrator.shell.publisher import Broadcast, Publisher
from fl_orchestrator.shell.quarantine import Quarantine
from fl_orchestrator.shell.watcher import PathBatch, watch_job_files
from fl_orchestrator.wire.layout import FileKind, JobLayout, task_id_of_result
from fl_orchestrator.wire.messages import HeartbeatMessage, ResultMessage, model_spec
from fl_orchestrator.wire.reasons import Reason

log = structlog.get_logger("fl_orchestrator.daemon")

EXIT_DONE = 0
EXIT_JOB_FAILED = 1
EXIT_SOFTWARE = 70

_STATE_OF_PHASE = {Phase.DONE: "done", Phase.FAILED: "failed"}

Clock = Callable[[], float]
Evaluate = Callable[[dict[str, np.ndarray]], dict[str, float]]


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
    ) -> None:
        self.config = config
        self.clock = clock
        self.handle_signals = handle_signals
        self.notifier = notifier or SystemdNotifier.from_environment({})
        self.job = config.job.name
        self.layout = JobLayout(config.syftbox.root, self.job, config.syftbox.aggregator_email)
        self.state_dir = config.state.state_dir
        self.store = ModelStore(self.state_dir, self.job)
        self.journal = Journal(self.state_dir, self.job)
        self.publisher = Publisher(self.layout, config.syftbox.datasites)
        self.quarantine = Quarantine(self.state_dir / "quarantine")
        self.strategy = make_strategy(config.strategy.name)
        self.evaluate: Evaluate | None = None
        if config.evaluate.global_evaluate:
            self.evaluate = load_callable(config.evaluate.global_evaluate, what="evaluate.global_evaluate")
        self.run_id = secrets.token_hex(8)
        self.machine: RoundMachine | None = None
        self.global_model: dict[str, np.ndarray] = {}
        self.broadcast: Broadcast | None = None
        self.seen: dict[Path, FileIdentity] = {}
        self.exit_code: int | None = None
        self.final_model_path: Path | None = None
        self.last_evaluate: dict[str, float] = {}
        self.failure_reason: str | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self) -> int:
        """Run the job to its end; return the process exit code."""
        await anyio.to_thread.run_sync(self._prepare)
        assert self.machine is not None
        reader = InboundReader(
            self.layout,
            frozenset(self.config.syftbox.datasites),
            model_spec(self.global_model),
            self.config.limits,
        )
        batches_send, batches_recv = anyio.create_memory_object_stream[PathBatch](16)
        # Small buffer: each queued result holds a decoded model, so back-pressure
        # on intake is what keeps memory flat.
        events_send, events_recv = anyio.create_memory_object_stream[ev.Event](2)
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
            root.start_soon(self._intake, reader, batches_recv, events_send)
            interval = self.notifier.watchdog_interval_seconds()
            if interval is not None:
                root.start_soon(self._ping_watchdog, interval)
            self.notifier.ready(self._status_line())
            code = await self._round_loop(events_recv)
            self.exit_code = code
            root.cancel_scope.cancel()
        self.notifier.stopping(self._status_line())
        if self.exit_code is None:  # cancelled by a signal
            self.exit_code = EXIT_DONE
            with anyio.move_on_after(self.config.daemon.shutdown_timeout_seconds, shield=True):
                await anyio.to_thread.run_sync(self._write_status, "stopped")
            log.info("daemon.stopped", job=self.job, round=self.machine.round, phase=str(self.machine.phase))
        return self.exit_code

    def _prepare(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.layout.aggregator_dir.mkdir(parents=True, exist_ok=True)
        self.publisher.write_permissions()
        done_rounds = self.store.rounds()
        if done_rounds:
            last = done_rounds[-1]
            self.global_model = self.store.load(last)
            log.info("job.resumed", job=self.job, completed_round=last, model=str(self.store.path_for(last)))
        else:
            last = 0
            self.global_model = initial_model(self.config.model)
            self.store.save(0, self.global_model)
            self.last_evaluate = self._run_evaluate_sync(0)
        self.machine = RoundMachine(rules_from_config(self.config, self.run_id), first_round=last + 1)
        params = sum(a.size for a in self.global_model.values())
        log.info(
            "job.started",
            job=self.job,
            run_id=self.run_id,
            first_round=last + 1,
            num_rounds=self.config.job.num_rounds,
            datasites=len(self.config.syftbox.datasites),
            parameters=params,
            model_bytes=sum(a.nbytes for a in self.global_model.values()),
            state_dir=str(self.state_dir),
        )

    async def _ping_watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself, so a loop that stops turning stops the pings.
        while True:
            self.notifier.watchdog()
            await anyio.sleep(interval)

    def _status_line(self) -> str:
        if self.machine is None:
            return "starting"
        return f"{self.job}: round {min(self.machine.round, self.config.job.num_rounds)}/" + (
            f"{self.config.job.num_rounds} {self.machine.phase}"
        )

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if scope.cancel_called:
                    log.warning("daemon.second_signal", signal=signal.Signals(signum).name)
                    os._exit(128 + signum)
                log.info("daemon.stopping", signal=signal.Signals(signum).name)
                scope.cancel()

    # ---- intake ------------------------------------------------------------------------

    async def _intake(
        self,
        reader: InboundReader,
        batches: ObjectReceiveStream[PathBatch],
        events: ObjectSendStream[ev.Event],
    ) -> None:
        async for batch in batches:
            for path in batch:
                await self._intake_one(reader, path, events)

    async def _intake_one(
        self, reader: InboundReader, path: Path, events: ObjectSendStream[ev.Event]
    ) -> None:
        classified = self.layout.classify(path)
        if classified is None or classified.kind == FileKind.IGNORED:
            return
        if classified.bad_name:
            await self._refuse(path, classified.datasite, Reason.BAD_NAME, "not <task id>.result")
            return
        try:
            info = os.lstat(path)
        except OSError:
            return  # gone already: a later event or rescan will say if it comes back
        previous = self.seen.get(path)
        if previous and previous == FileIdentity(info.st_ino, info.st_size, info.st_mtime_ns):
            return
        outcome = await anyio.to_thread.run_sync(
            reader.read_inbound, path, classified.kind, classified.datasite
        )
        if isinstance(outcome, Refused):
            await self._refuse(path, outcome.datasite, outcome.reason, outcome.detail)
            return
        self.seen[path] = outcome.identity
        await events.send(self._event_for(outcome))

    def _event_for(self, inbound: Inbound) -> ev.Event:
        message = inbound.message
        now = self.clock()
        if isinstance(message, HeartbeatMessage):
            return ev.NodeSeen(now, inbound.datasite)
        assert isinstance(message, ResultMessage)
        env = message.envelope
        reply_to = env.reply_to
        if reply_to != task_id_of_result(inbound.path):
            reply_to = None  # the name and the content disagree: never matches a task
        return ev.ResultReceived(
            now=now,
            datasite=inbound.datasite,
            round=env.round,
            reply_to=reply_to,
            ok=message.ok,
            num_examples=message.num_examples,
            metrics=message.metrics,
            error_type=message.error_type,
            error_message=message.error_message,
            payload=(inbound.path, message),
        )

    async def _refuse(self, path: Path, datasite: str, reason: Reason, detail: str) -> None:
        await anyio.to_thread.run_sync(
            lambda: self.quarantine.refuse(path, datasite, reason, detail, job=self.job)
        )
        self.seen.pop(path, None)

    # ---- the round loop ----------------------------------------------------------------

    async def _round_loop(self, events: ObjectReceiveStream[ev.Event]) -> int:
        assert self.machine is not None
        await self._feed(ev.Started(self.clock()))
        while self.exit_code is None:
            wake = self.machine.next_wakeup()
            timeout = math.inf if wake is None else max(0.0, wake - self.clock())
            event: ev.Event | None = None
            with anyio.move_on_after(timeout):
                event = await events.receive()
            await self._feed(event if event is not None else ev.Tick(self.clock()))
        return self.exit_code

    async def _feed(self, event: ev.Event) -> None:
        assert self.machine is not None
        phase_before = (self.machine.phase, self.machine.round)
        for action in self.machine.handle(event):
            for follow_up in await self._execute(action):
                await self._feed(follow_up)
        if (self.machine.phase, self.machine.round) != phase_before:
            await anyio.to_thread.run_sync(
                self._write_status, _STATE_OF_PHASE.get(self.machine.phase, "running")
            )
            self.notifier.status(self._status_line())

    async def _execute(self, action: ev.Action) -> list[ev.Event]:
        if isinstance(action, ev.Dispatch):
            await self._dispatch(action)
        elif isinstance(action, ev.Accept):
            await self._accept(action)
        elif isinstance(action, ev.Reject):
            path, _ = action.payload
            await self._refuse(path, action.datasite, action.reason, action.detail)
        elif isinstance(action, ev.RecordFailure):
            log.warning(
                "result.failed",
                job=self.job,
                round=action.round,
                datasite=action.datasite,
                error_type=action.error_type,
                error_message=action.error_message,
            )
        elif isinstance(action, ev.AwaitNodes):
            log.warning(
                "round.waiting_for_nodes",
                job=self.job,
                round=action.round,
                available=len(action.available),
                needed=action.needed,
                missing=list(action.missing),
                wait_seconds_left=round(action.until - self.clock(), 3),
            )
        elif isinstance(action, ev.AbandonAttempt):
            log.warning(
                "round.attempt_failed",
                job=self.job,
                round=action.summary.round,
                attempt=action.summary.attempt,
                reason=action.reason,
                retry=action.retry,
                succeeded=list(action.summary.succeeded),
                failed=action.summary.failed,
                timed_out=list(action.summary.timed_out),
            )
        elif isinstance(action, ev.Aggregate):
            return await self._aggregate(action.summary)
        elif isinstance(action, ev.JobFinished):
            self.exit_code = EXIT_DONE
            log.info(
                "job.finished",
                job=self.job,
                rounds=action.rounds,
                final_model=str(self.final_model_path or self.store.path_for(action.rounds)),
                evaluate_metrics=self.last_evaluate,
            )
        elif isinstance(action, ev.JobFailed):
            self.exit_code = EXIT_JOB_FAILED
            self.failure_reason = action.reason
            log.error("job.failed", job=self.job, reason=action.reason)
        return []

    async def _dispatch(self, action: ev.Dispatch) -> None:
        started = time.perf_counter()
        if self.broadcast is None or self.broadcast.round != action.round:
            self.broadcast = await anyio.to_thread.run_sync(
                self.publisher.write_model, action.round, self.global_model
            )
        self.strategy.begin_round(action.round, self.global_model)
        config: dict[str, Any] = dict(self.config.job.train_config)
        config.update(self.strategy.round_config(action.round))
        config["server-round"] = action.round
        broadcast = self.broadcast
        task_bytes = await anyio.to_thread.run_sync(
            lambda: self.publisher.write_tasks(
                broadcast, action.tasks, attempt=action.attempt, deadline=action.deadline, config=config
            )
        )
        log.info(
            "round.dispatched",
            job=self.job,
            round=action.round,
            attempt=action.attempt,
            phase="train",
            selected=sorted(action.tasks),
            model=broadcast.ref.path,
            model_bytes=broadcast.nbytes,
            task_bytes=task_bytes,
            deadline_in_seconds=round(action.deadline - self.clock(), 3),
            dispatch_seconds=round(time.perf_counter() - started, 6),
        )

    async def _accept(self, action: ev.Accept) -> None:
        path, message = action.payload
        started = time.perf_counter()
        with anyio.fail_after(self.config.daemon.aggregation_timeout_seconds):
            await anyio.to_thread.run_sync(self.strategy.fold, message.arrays, action.num_examples)
        log.info(
            "result.accepted",
            job=self.job,
            round=action.round,
            datasite=action.datasite,
            num_examples=action.num_examples,
            metrics=message.metrics,
            path=str(path),
            fold_seconds=round(time.perf_counter() - started, 6),
        )

    async def _aggregate(self, summary: ev.RoundSummary) -> list[ev.Event]:
        started = time.perf_counter()
        try:
            with anyio.fail_after(self.config.daemon.aggregation_timeout_seconds):
                new_model = await anyio.to_thread.run_sync(self.strategy.finish, abandon_on_cancel=True)
                path = await anyio.to_thread.run_sync(self.store.save, summary.round, new_model)
        except Exception as exc:  # a failed aggregation ends the job with its reason
            log.exception("round.aggregation_failed", job=self.job, round=summary.round)
            return [ev.AggregationFailed(self.clock(), summary.round, f"{type(exc).__name__}: {exc}")]
        aggregate_seconds = time.perf_counter() - started
        self.global_model = new_model
        self.final_model_path = path
        evaluate = await self._evaluate(summary.round)
        line = await anyio.to_thread.run_sync(
            lambda: self.journal.append_round(
                summary, evaluate=evaluate, aggregate_seconds=aggregate_seconds, model_path=path
            )
        )
        log.info(
            "round.completed",
            job=self.job,
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
            collect_seconds=line["collect_seconds"],
            aggregate_seconds=round(aggregate_seconds, 6),
            model=str(path),
        )
        return [ev.RoundAggregated(self.clock(), summary.round)]

    async def _evaluate(self, rnd: int) -> dict[str, float]:
        if self.evaluate is None:
            return {}
        with anyio.move_on_after(self.config.evaluate.timeout_seconds) as scope:
            self.last_evaluate = await anyio.to_thread.run_sync(
                self._run_evaluate_sync, rnd, abandon_on_cancel=True
            )
        if scope.cancelled_caught:
            log.error(
                "evaluate.timeout",
                job=self.job,
                round=rnd,
                timeout_seconds=self.config.evaluate.timeout_seconds,
            )
            return {}
        return self.last_evaluate

    def _run_evaluate_sync(self, rnd: int) -> dict[str, float]:
        if self.evaluate is None:
            return {}
        started = time.perf_counter()
        try:
            raw = self.evaluate({k: v.copy() for k, v in self.global_model.items()})
            metrics = {str(k): float(v) for k, v in dict(raw).items()}
        except Exception as exc:  # user code: one failed evaluation is logged, not fatal
            log.error("evaluate.failed", job=self.job, round=rnd, error=f"{type(exc).__name__}: {exc}")
            return {}
        log.info(
            "evaluate.done",
            job=self.job,
            round=rnd,
            phase="evaluate",
            metrics=metrics,
            evaluate_seconds=round(time.perf_counter() - started, 6),
        )
        return metrics

    def _write_status(self, state: str, extra: dict[str, Any] | None = None) -> None:
        assert self.machine is not None
        merged: dict[str, Any] = {"quarantined": self.quarantine.counts, "last_evaluate": self.last_evaluate}
        if self.failure_reason:
            merged["error"] = self.failure_reason
        merged.update(extra or {})
        try:
            self.journal.write_status(self.machine, now=self.clock(), state=state, extra=merged)
        except OSError as exc:
            log.error("status.write_failed", path=str(self.journal.status_path), error=exc.strerror)

    @property
    def phase(self) -> Phase | None:
        """The machine's phase (None before start)."""
        return self.machine.phase if self.machine else None


def final_model_of(state_dir: Path, job: str) -> Path | None:
    """The latest saved round's model path, if any."""
    store = ModelStore(state_dir, job)
    rounds = store.rounds()
    return store.path_for(rounds[-1]) if rounds else None
