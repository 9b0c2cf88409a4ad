"""Where each file of a job lives in the SyftBox tree, and what a path means.

Every party writes only inside its own datasite, so SyftBox's owner rule is
all the write permission the protocol needs; permission files grant reads.

    datasites/<aggregator>/app_data/fl_orchestrator/<job>/
        syft.pub.yaml, syftperm.yaml        read grants for the job's datasites
        models/global-r00003-<sha12>.msgpack  the round's model, written once
        tasks/<datasite>/<task id>.task     one small task per selected datasite
    datasites/<datasite>/app_data/fl_orchestrator/<job>/
        syft.pub.yaml, syftperm.yaml        read grant for the aggregator
        heartbeat.msgpack                   presence
        results/<task id>.result            the reply to that task
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

APP_NAME = "fl_orchestrator"
TEMP_SUFFIX = ".tmp"
# Written into each datasite's task folder when the job ends, done or failed.
JOB_ENDED = "job.ended"
_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")


class FileKind(Enum):
    """What a path under a datasite's job folder is."""

    RESULT = "result"
    HEARTBEAT = "heartbeat"
    IGNORED = "ignored"


@dataclass(frozen=True)
class Classified:
    """A path under datasites/, read as (datasite, kind)."""

    datasite: str
    kind: FileKind
    bad_name: bool = False


@dataclass(frozen=True)
class JobLayout:
    """Paths of one job under one SyftBox root."""

    root: Path
    job: str
    aggregator: str

    @property
    def datasites_dir(self) -> Path:
        """The folder that holds every datasite."""
        return self.root / "datasites"

    def app_dir(self, email: str) -> Path:
        """A party's folder for this job."""
        return self.datasites_dir / email / "app_data" / APP_NAME / self.job

    @property
    def aggregator_dir(self) -> Path:
        """The aggregator's folder for this job."""
        return self.app_dir(self.aggregator)

    @property
    def models_dir(self) -> Path:
        """Where broadcast global models go."""
        return self.aggregator_dir / "models"

    def model_name(self, rnd: int, sha256: str) -> str:
        """File name of round rnd's broadcast model, unique by content."""
        return f"global-r{rnd:05d}-{sha256[:12]}.msgpack"

    def tasks_dir(self, datasite: str) -> Path:
        """Where the aggregator writes tasks for one datasite."""
        return self.aggregator_dir / "tasks" / datasite

    def task_path(self, datasite: str, task_id: str) -> Path:
        """One task file."""
        return self.tasks_dir(datasite) / f"{task_id}.task"

    def job_ended_path(self, datasite: str) -> Path:
        """The marker that tells a datasite the job has ended (in its own task folder)."""
        return self.tasks_dir(datasite) / JOB_ENDED

    def results_dir(self, datasite: str) -> Path:
        """Where a datasite writes its results."""
        return self.app_dir(datasite) / "results"

    def result_path(self, datasite: str, task_id: str) -> Path:
        """The reply to one task (named by the task id so a re-run is idempotent)."""
        return self.results_dir(datasite) / f"{task_id}.result"

    def heartbeat_path(self, datasite: str) -> Path:
        """A datasite's presence file."""
        return self.app_dir(datasite) / "heartbeat.msgpack"

    def classify(self, path: Path) -> Classified | None:
        """Read a path under datasites/ as a datasite's result or heartbeat.

        Returns None for anything outside a datasite's folder for this job,
        including a path with a '.' or '..' part: pathlib keeps those, so
        ``datasites/../x`` would otherwise pass for a path under datasites/.
        Temp names are IGNORED: they are writes still under way. A result
        whose name is not ``<1-64 letters/digits>.result`` directly under
        ``results/`` has ``bad_name`` (that covers '..', backslashes and
        anything else a name could smuggle in).
        """
        try:
            rel = path.relative_to(self.datasites_dir)
        except ValueError:
            return None
        parts = rel.parts
        if any(part in ("", ".", "..") for part in parts):
            return None
        if len(parts) < 5 or parts[1:4] != ("app_data", APP_NAME, self.job):
            return None
        datasite, rest = parts[0], parts[4:]
        name = rest[-1]
        if name.endswith(TEMP_SUFFIX) or name.startswith("."):
            return Classified(datasite, FileKind.IGNORED)
        if rest == ("heartbeat.msgpack",):
            return Classified(datasite, FileKind.HEARTBEAT)
        if len(rest) == 2 and rest[0] == "results" and name.endswith(".result"):
            stem = name[: -len(".result")]
            return Classified(datasite, FileKind.RESULT, bad_name=not _ID.fullmatch(stem))
        if len(rest) > 2 and rest[0] == "results":
            return Classified(datasite, FileKind.RESULT, bad_name=True)
        return Classified(datasite, FileKind.IGNORED)


def task_id_of_result(path: Path) -> str:
    """The task id a result file's name claims to answer."""
    return path.name[: -len(".result")]
