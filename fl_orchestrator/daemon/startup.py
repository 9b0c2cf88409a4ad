"""Start-up: from whatever the state folder holds to a machine ready to run.

``prepare`` (blocking, in a worker thread) decides between a fresh run, a
resumed one and a finished one, and writes what a fresh run starts from.
``resume`` replays the open round's log through the round driver, re-reading
every counted result and checking it is still the bytes that were validated.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from fl_orchestrator.config.render import config_to_toml
from fl_orchestrator.config.schema import JobConfig
from fl_orchestrator.core import events as ev
from fl_orchestrator.core.machine import Phase, RoundMachine, RoundRules
from fl_orchestrator.daemon.recording import event_for_record
from fl_orchestrator.daemon.reports import Reports
from fl_orchestrator.daemon.round_work import RoundWork
from fl_orchestrator.daemon.rounds import RoundDriver, previous_metrics_of
from fl_orchestrator.intake.loop import IntakeLoop
from fl_orchestrator.intake.recovery import recover_counted
from fl_orchestrator.intake.safe_read import FileIdentity
from fl_orchestrator.storage import failpoints
from fl_orchestrator.storage.atomic import atomic_write_text
from fl_orchestrator.storage.checkpoints import Checkpoint
from fl_orchestrator.storage.job_state import JobState, StartPoint
from fl_orchestrator.storage.jsonl import repair_tail
from fl_orchestrator.storage.kept import KeptResults
from fl_orchestrator.storage.models import initial_model
from fl_orchestrator.storage.round_log import DispatchRecord, Record, ResultRecord

log = structlog.get_logger("fl_orchestrator.daemon")


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
        # A syft-flwr owner never writes a heartbeat: present from its rpc.schema.json (or an
        # answer) until it misses a deadline (timeout_means_gone).
        presence_ttl_seconds=math.inf if job.protocol == "syft-flwr" else box.presence_ttl_seconds,
        selection_seed=job.selection_seed,
        fraction_evaluate=job.fraction_evaluate,
        min_evaluate_nodes=job.min_evaluate_nodes,
        timeout_means_gone=job.protocol == "syft-flwr",
        max_num_examples_growth=config.limits.max_num_examples_growth,
        outlier_norm_factor=config.limits.outlier_norm_factor,
        paced_by_root=job.role == "region",
        root_margin_seconds=config.region.deadline_margin_seconds,
    )


@dataclass
class Startup:
    """What start-up reads and writes."""

    config: JobConfig
    state: JobState
    reports: Reports
    work: RoundWork
    kept: KeptResults

    def prepare(self, *, rerun: bool) -> tuple[StartPoint, RoundMachine | None]:
        """The start point, and the machine to run (None: the run already ended)."""
        start = self.state.start(rerun=rerun)
        structlog.contextvars.bind_contextvars(run=start.run.run_id)
        if start.complete:
            (log.info if start.run.status == "done" else log.error)(
                "job.already_complete" if start.run.status == "done" else "job.already_failed",
                run_id=start.run.run_id,
                finished=start.run.finished,
                reason=start.run.reason,
                hint="start with --rerun to run it again; this run's outputs are archived, not overwritten",
            )
            return start, None
        self._write_start_files()
        rules = rules_from_config(self.config, start.run.run_id)
        work = self.work
        if start.checkpoint is None:
            machine = RoundMachine(rules)
            self._write_round_zero(start.run.run_id)
        else:
            checkpoint = start.checkpoint
            machine = RoundMachine(rules, first_round=checkpoint.round + 1, records=checkpoint.records)
            self.kept.prune(checkpoint.round)
            work.global_model = checkpoint.model
            work.strategy.load_state_dict(checkpoint.strategy_state)
            lines = self.reports.round_lines()
            if lines and lines[-1].get("round") == checkpoint.round:
                work.previous_metrics = previous_metrics_of(lines[-1])
                evaluations = self.reports.evaluation_lines()
                if evaluations and evaluations[-1].get("round") == checkpoint.round:
                    work.previous_metrics["federated_evaluate"] = dict(evaluations[-1]["metrics"])
        failpoints.hit("start.done")
        log.info(
            "job.started" if start.checkpoint is None else "job.resumed",
            run_id=start.run.run_id,
            completed_round=machine.round - 1,
            num_rounds=self.config.job.num_rounds,
            datasites=len(self.config.syftbox.datasites),
            parameters=sum(a.size for a in work.global_model.values()),
            model_bytes=sum(a.nbytes for a in work.global_model.values()),
            state_dir=str(self.config.state.state_dir),
        )
        return start, machine

    def _write_start_files(self) -> None:
        durably = self.state.retry.run_blocking
        for jsonl in (self.reports.metrics_path, self.reports.evaluations_path):
            durably(functools.partial(repair_tail, jsonl), what="torn last line", path=jsonl)
        publisher = self.work.publisher
        leftovers = durably(publisher.prepare, what="folders and permissions", path=publisher.tasks_dir)
        for leftover in leftovers:
            log.info("syftbox.leftover_removed", path=str(leftover))
        # Beside the state it produced, so the run can be reproduced exactly.
        effective = self.config.state.state_dir / "effective-config.toml"
        config_text = config_to_toml(self.config)
        durably(lambda: atomic_write_text(effective, config_text), what="config", path=effective)

    def _write_round_zero(self, run_id: str) -> None:
        durably = self.state.retry.run_blocking
        work = self.work
        model = work.global_model = initial_model(self.config.model)
        durably(lambda: work.store.save(0, model), what="global model", path=work.store.path_for(0))
        work.evaluate_sync(0)
        first = Checkpoint(0, run_id, model, work.strategy.state_dict(), {})
        checkpoints = self.state.checkpoints
        durably(lambda: checkpoints.save(first), what="checkpoint", path=checkpoints.path_for(0))

    async def resume(self, driver: RoundDriver, intake: IntakeLoop) -> None:
        """Replay the open round's log, refolding what was counted before a crash.

        After a checkpoint fallback the round replayed may have closed, and the
        next one may already be out: its aggregate is finished here and the
        next round's logged attempt entered, never dispatched a second time.
        """
        machine = driver.machine
        assert machine is not None
        for earlier in await anyio.to_thread.run_sync(self.state.accepted_paths, machine.round - 1):
            intake.seen[Path(earlier.path)] = FileIdentity(*earlier.identity)
        driver.replaying = True
        try:
            replayed = False
            while records := await anyio.to_thread.run_sync(self.state.records_of, machine.round):
                replayed = True
                await self._replay(driver, intake, records)
                later = await anyio.to_thread.run_sync(self.state.records_of, machine.round + 1)
                if driver.pending_aggregate is None or not later:
                    break
                summary, driver.pending_aggregate = driver.pending_aggregate, None
                log.info("round.replayed_past_checkpoint", round=summary.round)
                for follow_up in await driver.aggregate(summary):
                    await driver.feed(follow_up)
        finally:
            driver.replaying = False
        if not replayed:
            return
        if machine.phase == Phase.TRAINING:
            fresh = self.config.daemon.restart_grants_fresh_timeout
            await driver.feed(ev.Started(driver.clock(), fresh_deadline=fresh))
        current = machine.current
        log.info(
            "round.resumed",
            round=machine.round,
            phase=str(machine.phase),
            attempt=current.attempt if current else None,
            counted=sorted(current.answered()) if current else [],
            deadline_in_seconds=round(current.deadline - driver.clock(), 3) if current else None,
        )
        if machine.phase == Phase.TRAINING and current is not None:
            # Tasks and the model may not all have been written before the crash. Not to the
            # datasites already counted: asked again, a syft-flwr owner would train again.
            answered = set(current.answered())
            pending = {d: task for d, task in current.tasks.items() if d not in answered}
            redo = ev.Dispatch(
                current.round, current.attempt, pending, current.deadline, current.dispatched_at
            )
            await self.work.dispatch(redo, begin=False)

    async def _replay(self, driver: RoundDriver, intake: IntakeLoop, records: list[Record]) -> None:
        """Feed one round's logged decisions back into the machine."""
        machine = driver.machine
        assert machine is not None
        for record in records:
            if isinstance(record, DispatchRecord):
                await driver.feed(
                    ev.AttemptReplayed(record.attempt, record.tasks, record.dispatched_at, record.deadline)
                )
                structlog.contextvars.bind_contextvars(attempt=record.attempt)
                self.work.strategy.begin_round(machine.round, self.work.global_model)
                self.work.accepted_files = []
                continue
            message = None
            if isinstance(record, ResultRecord) and record.ok:
                outcome = await anyio.to_thread.run_sync(
                    recover_counted, intake.reader, self.kept, machine.round, record
                )
                if isinstance(outcome, str):
                    # Not counted after all: its datasite may answer again before the deadline.
                    log.warning(
                        "result.recollect",
                        round=machine.round,
                        datasite=record.datasite,
                        reason="counted result gone or changed since it was counted",
                        detail=outcome,
                    )
                    continue
                message = outcome
            if isinstance(record, ResultRecord):
                intake.seen[Path(record.path)] = FileIdentity(*record.identity)
            await driver.feed(event_for_record(record, machine.round, message))
