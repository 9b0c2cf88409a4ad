"""What a runner with no task yet is waiting for, said at start and every few minutes.

A datasite pointed at the wrong job or aggregator, or not listed in the job,
would otherwise idle silently for ever. It cannot see the coordinator's job
file, but it can see how far the job's folders have come: none of the
aggregator's job folder (the job has not started here, or a name differs),
the job folder without a task folder for it (not selected yet, or not listed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fl_orchestrator.wire.layout import JobLayout


@dataclass(frozen=True)
class Waiting:
    """One log line's worth: what is missing, where, and what to check."""

    waiting_for: str
    path: str
    hint: str


def what_we_wait_for(layout: JobLayout, email: str) -> Waiting:
    """Read the folders now; never raises (a folder we cannot stat counts as missing)."""
    job_dir = layout.aggregator_dir
    if not _is_dir(job_dir):
        return Waiting(
            "the aggregator's job folder",
            str(job_dir),
            f"the job has not started, or it has not synced yet; if the coordinator runs, check that"
            f" --job {layout.job!r} and --aggregator {layout.aggregator!r} are the job's name and"
            " [syftbox] aggregator_email, and that --syftbox-root is the folder the SyftBox client syncs",
        )
    return Waiting(
        "a task",
        str(layout.tasks_dir(email)),
        f"the job exists but has sent {email} nothing yet: it may be waiting for other datasites, or"
        f" the coordinator may not list {email} in [syftbox] datasites (its log says datasite.unlisted)",
    )


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False
