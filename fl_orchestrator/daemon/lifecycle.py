"""The daemon's life: start-up, then the main loop, then shutdown.

Start-up takes the state folder's lock, prepares or resumes the run
(daemon/startup.py) and replays the open round. The main loop is one anyio
task group, the root: the watcher (paths), the intake (paths -> decoded
events, in worker threads), the round loop (events -> machine -> actions,
daemon/rounds.py), the status writer, the signal listener and the systemd
watchdog. Shutdown writes the last status within one deadline.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from fl_orchestrator.aggregation.registry import build_strategy
from fl_orchestrator.config.hooks import load_callable
from fl_orchestrator.config.schema import JobConfig
from fl_orchestrator.core import events as ev
from fl_orchestrator.core.machine import RoundMachine
from fl_orchestrator.daemon.reports import Reports
from fl_orchestrator.daemon.root_link import RootLink
from fl_orchestrator.daemon.round_work import RoundWork
from fl_orchestrator.daemon.rounds import EXIT_DONE, EXIT_JOB_FAILED, RoundDriver
from fl_orchestrator.daemon.sdnotify import SystemdNotifier
from fl_orchestrator.daemon.signals import StopSignals
from fl_orchestrator.daemon.startup import Startup, rules_from_config
from fl_orchestrator.intake.adapter import WireAdapter
from fl_orchestrator.intake.ledger import read_ledger
from fl_orchestrator.intake.loop import IntakeLoop
from fl_orchestrator.intake.quarantine import Quarantine
from fl_orchestrator.intake.reader import InboundReader
from fl_orchestrator.intake.watcher import PathBatch, watch_job_files
from fl_orchestrator.protocols.contract import Publisher
from fl_orchestrator.protocols.native import NativeWire
from fl_orchestrator.protocols.native import Publisher as NativePublisher
from fl_orchestrator.storage.job_state import JobState
from fl_orchestrator.storage.kept import KeptResults
from fl_orchestrator.storage.lock import StateLock
from fl_orchestrator.storage.models import ModelStore
from fl_orchestrator.wire.layout import JobLayout
from fl_orchestrator.wire.messages import model_spec

if TYPE_CHECKING:
    from fl_orchestrator.protocols.syft_flwr.wire import SyftFlwrWire

__all__ = ["EXIT_DONE", "EXIT_JOB_FAILED", "EXIT_SOFTWARE", "Daemon", "rules_from_config"]

log = structlog.get_logger("fl_orchestrator.daemon")

EXIT_SOFTWARE = 70

Clock = Callable[[], float]


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
        self.notifier = notifier or SystemdNotifier.from_environment({})
        self.rerun = rerun
        # Signals that arrived before the root task group listened (cli/daemon_entry.py).
        self.signals = (
            StopSignals(stop_requests if stop_requests is not None else []) if handle_signals else None
        )
        job = config.job.name
        self.state_dir = config.state.state_dir
        self.lock = StateLock(self.state_dir)
        self.store = ModelStore(self.state_dir, job)
        self.reports = Reports(self.state_dir, job, config.daemon.prometheus_textfile_path)
        self.state = JobState(
            self.state_dir,
            job,
            keep_checkpoints=config.state.keep_checkpoints,
            retry_seconds=config.state.write_retry_seconds,
            models=self.store,
        )
        self.quarantine = Quarantine(
            self.state_dir / "quarantine",
            flag_after=config.limits.flag_after_rejections,
            keep_originals=config.daemon.quarantine_mode == "copy",
            retry=self.state.retry,
            max_bytes=config.daemon.quarantine_max_bytes,
            shares=len(config.syftbox.datasites) + 1,  # and one for files from strangers' folders
        )
        # One intake for every protocol: the protocol is an adapter (intake/adapter.py).
        self.layout = JobLayout(config.syftbox.root, job, config.syftbox.aggregator_email)
        self.syft_flwr: SyftFlwrWire | None = None
        self.wire: WireAdapter
        publisher: Publisher
        if config.job.protocol == "syft-flwr":
            from fl_orchestrator.protocols.syft_flwr.transport import SyftFlwrTransport

            transport = SyftFlwrTransport(config)
            publisher, self.wire = transport.publisher, transport.wire
            self.syft_flwr = transport.wire
        else:
            publisher = NativePublisher(self.layout, config.syftbox.datasites, config.syftbox.part_bytes)
            self.wire = NativeWire(self.layout)
        self.publisher = publisher
        self.kept = KeptResults(self.state_dir, self.layout.datasites_dir)
        self.work = RoundWork(
            config,
            publisher=publisher,
            wire=self.wire,
            store=self.store,
            strategy=build_strategy(
                config.strategy.name, dict(config.strategy.params), seed=config.job.selection_seed
            ),
            evaluate=_hook(config.evaluate.global_evaluate, "evaluate.global_evaluate"),
            clock=clock,
            retry=self.state.retry,
            kept=self.kept,
            configure_round=_hook(config.job.configure_round, "job.configure_round"),
            metrics_aggregation=_hook(config.job.metrics_aggregation, "job.metrics_aggregation"),
        )
        self.rounds = RoundDriver(
            config,
            work=self.work,
            state=self.state,
            reports=self.reports,
            quarantine=self.quarantine,
            kept=self.kept,
            notifier=self.notifier,
            clock=clock,
        )
        self.startup = Startup(config, self.state, self.reports, self.work, self.kept)
        self.root_link = RootLink(self.state_dir, self.store, clock) if config.job.role == "region" else None
        self.rounds.root_link = self.root_link
        # Run in the root task group once start-up is done (a region's runner in its root job).
        self.companions: list[Callable[[], Coroutine[Any, Any, None]]] = []

    @property
    def machine(self) -> RoundMachine | None:
        """The round machine, once start-up has built it."""
        return self.rounds.machine

    @property
    def exit_code(self) -> int | None:
        """The exit code, once the job has ended or the daemon has stopped."""
        return self.rounds.exit_code

    @property
    def failure_reason(self) -> str | None:
        """Why the job failed, if it did."""
        return self.rounds.failure_reason

    async def run(self) -> int:
        """Run the job to its end; return the process exit code.

        Raises LockHeld if another daemon runs this state folder, and
        StateWriteError (possibly inside an exception group) if a state write
        still failed after ``state.write_retry_seconds``.
        """
        structlog.contextvars.bind_contextvars(job=self.config.job.name)
        if self.config.job.role != "flat":
            structlog.contextvars.bind_contextvars(tier=self.config.job.role)
        self.lock.acquire()
        try:
            return await self._run()
        finally:
            self.lock.release()
            if self.signals is not None:
                self.signals.restore()
            if self.root_link is not None:
                self.root_link.stop()
            structlog.contextvars.unbind_contextvars("job", "run", "round", "attempt", "tier")

    async def _run(self) -> int:
        # ---- start-up
        start, machine = await anyio.to_thread.run_sync(lambda: self.startup.prepare(rerun=self.rerun))
        # Bound here too: what prepare bound lived in its worker thread's copy of the context.
        structlog.contextvars.bind_contextvars(run=start.run.run_id)
        # Everything allocated so far lives for the whole run: keep the collector
        # from scanning it again in every full collection (20 ms pauses measured).
        gc.freeze()
        if machine is None:
            self.rounds.failure_reason = start.run.reason
            if self.syft_flwr is not None:
                await self._resend_stop(start.run.reason or "job complete")
            # Killed after the end and before the datasites were told: tell them now.
            await self._announce_end(start.run.run_id, start.run.status, start.run.reason)
            return EXIT_DONE if start.run.status == "done" else EXIT_JOB_FAILED
        await self._announce_end(start.run.run_id, None, None)
        if self.syft_flwr is not None:
            self.syft_flwr.publisher.set_run(start.run.run_id)
        self.rounds.machine = machine
        structlog.contextvars.bind_contextvars(round=machine.round)
        intake = self.rounds.intake = IntakeLoop(
            self.wire,
            InboundReader(
                self.layout,
                frozenset(self.config.syftbox.datasites),
                model_spec(self.work.global_model),
                self.config.limits,
                global_model=self.work.global_model,
                global_model_round=machine.round,
            ),
            self.quarantine,
            self.clock,
            settle_seconds=self.config.daemon.partial_file_settle_seconds,
            unlisted_log_seconds=self.config.syftbox.presence_ttl_seconds,
            fold_wait_seconds=self.config.daemon.aggregation_timeout_seconds,
        )
        intake.on_refused = self.rounds.want_status
        # Files refused by an earlier run and left in place are not refused again (intake/ledger.py).
        ledger = await anyio.to_thread.run_sync(read_ledger, self.quarantine.directory)
        self.quarantine.restore_counts(ledger.counts)
        intake.seen.update(ledger.stayed)
        if ledger.records:
            log.info("quarantine.ledger_read", records=ledger.records, refused_in_place=len(ledger.stayed))
        if self.root_link is not None:
            # A region resumed mid-round sends what its root sent for that round, not its own model.
            await anyio.to_thread.run_sync(self.root_link.load_offer, machine.round)
            self.rounds.take_root_model(machine.round)
        await self.startup.resume(self.rounds, intake)
        # ---- the main loop
        batches_send, batches_recv = anyio.create_memory_object_stream[PathBatch](16)
        # Small buffer: each queued result holds a decoded model, so back-pressure
        # on intake is what keeps memory flat.
        events_send, events_recv = anyio.create_memory_object_stream[ev.Event](0)
        if self.root_link is not None:
            self.root_link.reference = self.work.global_model
            self.root_link.attach(events_send.clone(), lambda: machine.round)
        async with anyio.create_task_group() as root:
            if self.signals is not None:
                root.start_soon(self.signals.listen, root.cancel_scope)
            root.start_soon(
                lambda: watch_job_files(
                    self.wire,
                    self.config.syftbox.datasites,
                    batches_send,
                    debounce_milliseconds=self.config.daemon.watch_debounce_milliseconds,
                    rescan_interval_seconds=self.config.daemon.rescan_interval_seconds,
                )
            )
            root.start_soon(intake.run, batches_recv, events_send)
            for companion in self.companions:
                root.start_soon(companion)
            root.start_soon(self.rounds.write_status_when_wanted)
            root.start_soon(self.rounds.prune_kept_when_wanted)
            root.start_soon(self.rounds.refresh_status_soon)
            interval = self.notifier.watchdog_interval_seconds()
            if interval is not None:
                root.start_soon(self._ping_watchdog, interval)
            self.notifier.ready(self.rounds.status_line())
            await self.rounds.run(events_recv)
            if self.syft_flwr is not None:
                # The job ended (done or failed): tell syft-flwr's owners to exit, as its server does.
                # The intake still runs meanwhile: it reads their answers.
                reason = self.rounds.failure_reason or "job complete"
                await self.syft_flwr.finish(reason, wait_seconds=self.config.syft_flwr.stop_wait_seconds)
            await self.rounds.write_last_status()
            outcome = "done" if self.rounds.exit_code == EXIT_DONE else "failed"
            await self._announce_end(start.run.run_id, outcome, self.rounds.failure_reason)
            root.cancel_scope.cancel()
        # ---- shutdown
        self.notifier.stopping(self.rounds.status_line())
        self.state.close()
        if self.rounds.exit_code is not None:
            return self.rounds.exit_code
        # Stopped by a signal: every decision is already durable in the round log.
        if self.signals is not None:
            self.signals.draining()
        self.rounds.exit_code = EXIT_DONE
        with anyio.move_on_after(self.config.daemon.shutdown_timeout_seconds, shield=True):
            await self.rounds.write_last_status("stopped")
        log.info("daemon.stopped", round=machine.round, phase=str(machine.phase))
        return EXIT_DONE

    async def _announce_end(self, run_id: str, outcome: str | None, reason: str | None) -> None:
        """Native datasites learn that the job ended (their runners exit); None: a run is under way."""
        if not isinstance(self.publisher, NativePublisher):
            return  # syft-flwr owners get the stop message instead
        publisher = self.publisher
        try:
            if outcome is None:
                await anyio.to_thread.run_sync(publisher.withdraw_end)
            else:
                await anyio.to_thread.run_sync(publisher.announce_end, run_id, outcome, reason)
                log.info("job.end_announced", outcome=outcome, datasites=len(publisher.datasites))
        except OSError as exc:  # the datasites then run on until stopped: said, not fatal
            log.error("job.end_not_announced", error=str(exc))

    async def _resend_stop(self, reason: str) -> None:
        """Killed after the job ended but before the stop went out: send it now."""
        assert self.syft_flwr is not None
        try:
            await anyio.to_thread.run_sync(
                self.syft_flwr.publisher.send_stop, self.config.syftbox.datasites, reason
            )
        except OSError as exc:  # best effort: the job's outcome is already settled
            log.warning("syft_flwr.stop_not_sent", error=str(exc))

    async def _ping_watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself, so a loop that stops turning stops the pings.
        while True:
            self.notifier.watchdog()
            await anyio.sleep(interval)


def _hook(name: str | None, what: str) -> Any:
    """A user hook named in the config, imported now (a typo fails at start, not at round 1)."""
    return load_callable(name, what=what) if name else None
