"""Durable state of a running job: run record, checkpoints and round logs.

Every write here is atomic and fsynced. A write that fails (disk full,
permission denied) leaves the previous state intact, is logged with its path,
and is retried with backoff (storage/retry.py); if it still fails the daemon
stops with EX_IOERR rather than running on with state it cannot keep.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog

from fl_orchestrator.storage.atomic import remove_own_temps
from fl_orchestrator.storage.checkpoints import Checkpoint, CheckpointStore
from fl_orchestrator.storage.lock import LOCK_FILE
from fl_orchestrator.storage.models import ModelStore
from fl_orchestrator.storage.retry import EX_IOERR, StateWriteError, WriteRetry
from fl_orchestrator.storage.round_log import Record, ResultRecord, RoundLog, read_records
from fl_orchestrator.storage.run_record import (
    ARCHIVE_DIR,
    RunRecord,
    RunRecordError,
    archive_run,
    load_run,
    new_run,
    save_run,
)

__all__ = ["EX_IOERR", "JobState", "StartPoint", "StartRefused", "StateWriteError"]

log = structlog.get_logger("fl_orchestrator.persistence")

T = TypeVar("T")
# Entries that do not make a state folder "hold a run": ours, and kept across runs.
_NOT_RUN_CONTENT = frozenset({ARCHIVE_DIR, LOCK_FILE})


class StartRefused(Exception):
    """The state folder holds something the daemon must not run over."""


@dataclass(frozen=True)
class StartPoint:
    """Where a (re)started daemon begins."""

    run: RunRecord
    checkpoint: Checkpoint | None  # None: a fresh run, build round 0
    complete: bool  # the run already ended (done or failed): report it and exit


class JobState:
    """The state folder of one job."""

    def __init__(
        self,
        state_dir: Path,
        job: str,
        *,
        keep_checkpoints: int,
        retry_seconds: float,
        models: ModelStore | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.job = job
        self.checkpoints = CheckpointStore(state_dir, job, keep_checkpoints, models)
        self.rounds_dir = state_dir / "rounds"
        self.retry = WriteRetry(retry_seconds)
        self.run: RunRecord | None = None
        self._log: RoundLog | None = None

    # ---- start -------------------------------------------------------------------------

    def start(self, *, rerun: bool) -> StartPoint:
        """Decide between a fresh run, a resumed one and a finished one."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # A kill -9 mid-write leaves a temp file of ours: never content, never a reason to refuse.
        for leftover in remove_own_temps(self.state_dir, recursive=True):
            log.info("state.leftover_removed", path=str(leftover))
        try:
            run = load_run(self.state_dir, self.job)
        except RunRecordError as exc:
            raise StartRefused(str(exc)) from None
        if run is not None and rerun:
            archived = archive_run(self.state_dir, run)
            log.warning("run.archived", run_id=run.run_id, to=str(archived))
            run = None
        if run is None:
            if any(p.name not in _NOT_RUN_CONTENT for p in self.state_dir.iterdir()):
                raise StartRefused(
                    f"{self.state_dir} holds files but no run.json; refusing to write over them"
                    " (use an empty state_dir, or --rerun to archive what is there)"
                )
            self.run = self.retry.run_blocking(
                lambda: new_run(self.state_dir, self.job), what="run record", path=self.state_dir / "run.json"
            )
            return StartPoint(self.run, None, False)
        self.run = run
        if run.status in ("done", "failed"):
            # A failed run replays to the same failure: final too, until --rerun.
            return StartPoint(run, None, True)
        checkpoint = self.checkpoints.load_latest()
        if checkpoint is None:
            if self.checkpoints.rounds():
                raise StartRefused(f"every checkpoint in {self.checkpoints.directory} is corrupt")
            return StartPoint(run, None, False)
        if checkpoint.run_id != run.run_id:
            raise StartRefused(f"checkpoint round {checkpoint.round} belongs to run {checkpoint.run_id}")
        return StartPoint(run, checkpoint, False)

    def records_of(self, rnd: int) -> list[Record]:
        """Everything round rnd logged before a restart."""
        return list(read_records(self.rounds_dir / f"r{rnd:05d}.log"))

    def accepted_paths(self, up_to_round: int) -> list[ResultRecord]:
        """Results counted in rounds 1..up_to_round, so a restart does not read them again."""
        found: list[ResultRecord] = []
        for rnd in range(1, up_to_round + 1):
            found.extend(r for r in self.records_of(rnd) if isinstance(r, ResultRecord))
        return found

    # ---- writes ------------------------------------------------------------------------

    async def append(self, rnd: int, record: Record) -> None:
        """Log one record of round rnd durably."""
        if self._log is None or self._log.round != rnd:
            if self._log is not None:
                self._log.close()
            self._log = RoundLog(self.rounds_dir, rnd)
        round_log = self._log
        await self.durably(lambda: round_log.append(record), what="round log", path=round_log.path)

    async def save_checkpoint(self, checkpoint: Checkpoint) -> Path:
        """Commit a completed round."""
        return await self.durably(
            lambda: self.checkpoints.save(checkpoint),
            what="checkpoint",
            path=self.checkpoints.path_for(checkpoint.round),
        )

    async def finish(self, status: str, reason: str | None = None) -> None:
        """Mark the run done or failed."""
        assert self.run is not None
        self.run = RunRecord(self.run.job, self.run.run_id, self.run.started, status, time.time(), reason)
        record = self.run
        await self.durably(
            lambda: save_run(self.state_dir, record), what="run record", path=self.state_dir / "run.json"
        )

    async def durably(self, write: Callable[[], T], *, what: str, path: Path) -> T:
        """Run a state write in a worker thread, retrying failures with backoff."""
        return await self.retry.run(write, what=what, path=path)

    def close(self) -> None:
        """Close the open round log."""
        if self._log is not None:
            self._log.close()
            self._log = None
