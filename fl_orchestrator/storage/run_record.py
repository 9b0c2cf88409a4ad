"""run.json: which run owns a state folder, and whether it has finished.

A finished run is terminal: starting the daemon again reports it complete and
exits 0. Starting a new run of the same job takes an explicit ``--rerun``,
which moves the earlier run's outputs to ``state_dir/archive/<run id>/``
rather than overwriting them.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fl_orchestrator.storage.atomic import atomic_write_text, fsync_dir
from fl_orchestrator.storage.lock import LOCK_FILE

RUN_FILE = "run.json"
ARCHIVE_DIR = "archive"


class RunRecordError(Exception):
    """run.json exists but cannot be read or belongs to another job."""


@dataclass(frozen=True)
class RunRecord:
    """One run of a job."""

    job: str
    run_id: str
    started: float
    status: str  # running | done | failed
    finished: float | None = None
    reason: str | None = None


def load_run(state_dir: Path, job: str) -> RunRecord | None:
    """The run recorded in state_dir, if any."""
    path = state_dir / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RunRecordError(f"{path}: unreadable ({exc})") from None
    try:
        record = RunRecord(**data)
    except TypeError as exc:
        raise RunRecordError(f"{path}: unexpected content ({exc})") from None
    if record.job != job:
        raise RunRecordError(f"{path}: belongs to job {record.job!r}, not {job!r}; use another state_dir")
    return record


def save_run(state_dir: Path, record: RunRecord) -> None:
    """Write run.json atomically and durably."""
    atomic_write_text(state_dir / RUN_FILE, json.dumps(asdict(record), sort_keys=True))


def new_run(state_dir: Path, job: str) -> RunRecord:
    """Start a fresh run record."""
    record = RunRecord(job=job, run_id=secrets.token_hex(8), started=time.time(), status="running")
    save_run(state_dir, record)
    return record


def archive_run(state_dir: Path, record: RunRecord) -> Path:
    """Move everything of an earlier run under archive/<run id>/ (nothing is deleted)."""
    target = state_dir / ARCHIVE_DIR / record.run_id
    target.mkdir(parents=True, exist_ok=True)
    for entry in state_dir.iterdir():
        if entry.name in (ARCHIVE_DIR, LOCK_FILE):  # the lock belongs to the running daemon
            continue
        os.replace(entry, target / entry.name)
    fsync_dir(state_dir)
    return target
