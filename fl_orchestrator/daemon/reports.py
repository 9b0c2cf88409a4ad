"""What the daemon tells the outside world on disk: status.json and metrics.jsonl."""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from fl_orchestrator.core.events import RoundSummary
from fl_orchestrator.core.machine import RoundMachine
from fl_orchestrator.daemon import prometheus
from fl_orchestrator.storage.atomic import atomic_write_text
from fl_orchestrator.storage.jsonl import append_json_line, json_text, read_json_lines

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
PROMETHEUS_FILE = "fl_orchestrator.prom"
PROMETHEUS_EVERY_SECONDS = 15.0
EVALUATIONS_FILE = "evaluations.jsonl"


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux), or None if unknown.

    Written beside the pid in status.json so `fl-orchestrator status` can tell the
    daemon from an unrelated process that was later given the same pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat.rpartition(")")[2].split()
    try:
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    except (IndexError, ValueError):
        return None


class Reports:
    """status.json, rewritten atomically on every transition; metrics.jsonl, one line a round."""

    def __init__(self, state_dir: Path, job: str, prometheus_path: Path | None = None) -> None:
        self.state_dir = state_dir
        self.job = job
        self.status_path = state_dir / STATUS_FILE
        self.prometheus_path = prometheus_path or state_dir / PROMETHEUS_FILE
        # The last completed round's line and how many rounds have one (for the metrics file).
        self._last_round: dict[str, Any] | None = None
        self._rounds_completed: int | None = None
        self._prometheus_at = -math.inf
        self.metrics_path = state_dir / METRICS_FILE
        self.evaluations_path = state_dir / EVALUATIONS_FILE
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._pid_start_ticks = process_start_ticks(self._pid)

    def write_status_document(self, status: dict[str, Any], *, final: bool = False) -> None:
        """Write a snapshot taken by status_document, and the metrics file; safe in a worker thread.

        The metrics file follows at most every PROMETHEUS_EVERY_SECONDS (and at the end): with
        a thousand datasites it is most of a megabyte, and scrapes come every 15-60 s.
        """
        atomic_write_text(self.status_path, json_text(status, sort_keys=True), durable=False)
        now = time.monotonic()
        if not final and now - self._prometheus_at < PROMETHEUS_EVERY_SECONDS:
            return
        self._prometheus_at = now
        if self._rounds_completed is None:
            lines = self.round_lines()  # once, on the first write of this process (a resume)
            self._rounds_completed = len(lines)
            self._last_round = lines[-1] if lines else None
        totals = {
            "rounds_completed_total": self._rounds_completed,
            "bytes_written_total": status.get("bytes_written_total"),
        }
        text = prometheus.render(status, self._last_round, totals)
        atomic_write_text(self.prometheus_path, text, durable=False)

    def status_document(
        self, machine: RoundMachine, *, now: float, state: str, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Snapshot the machine for `fl-orchestrator status`.

        Take it in the thread that drives the machine: the snapshot copies
        everything, so it can then be written from another thread.

        Times (`deadline`, `dispatched_at`, `updated`, each datasite's `last_seen`) are
        the daemon clock's epoch seconds. `deadline` ends the open attempt while
        training and the wait for datasites while waiting for them. `host`, `pid` and
        `pid_start_ticks` identify the writing process, so a reader can tell whether
        it is still alive.
        """
        current = machine.current
        status: dict[str, Any] = {
            "job": self.job,
            "run_id": machine.rules.run_id,
            "state": state,
            "phase": str(machine.phase),
            "round": min(machine.round, machine.rules.num_rounds),
            "num_rounds": machine.rules.num_rounds,
            "attempt": current.attempt if current else None,
            "dispatched_at": current.dispatched_at if current else None,
            "deadline": current.deadline if current else machine.wait_until,
            "selected": sorted(current.tasks) if current else [],
            "answered": sorted(current.answered()) if current else [],
            "attempt_failures": dict(sorted(current.failed.items())) if current else {},
            "updated": now,
            "pid": self._pid,
            "pid_start_ticks": self._pid_start_ticks,
            "host": self._host,
            # vars, not asdict: flat records; asdict's deep copy took 10 ms on the event loop at N = 1,000.
            "datasites": {name: dict(vars(record)) for name, record in machine.records.items()},
        }
        if extra:
            status.update(extra)
        return status

    def append_evaluation(self, line: dict[str, Any]) -> None:
        """Append one federated evaluation to evaluations.jsonl."""
        append_json_line(self.evaluations_path, line)

    def round_lines(self) -> list[dict[str, Any]]:
        """Every intact metrics line, in order (a torn last line from a crash is skipped)."""
        return _json_lines(self.metrics_path)

    def evaluation_lines(self) -> list[dict[str, Any]]:
        """Every intact federated-evaluation line, in order."""
        return _json_lines(self.evaluations_path)

    def logged_rounds(self) -> set[int]:
        """Rounds that already have a metrics line."""
        return {int(line["round"]) for line in self.round_lines()}

    def append_round(
        self,
        summary: RoundSummary,
        *,
        evaluate: dict[str, float],
        aggregate_seconds: float,
        model_path: Path,
    ) -> dict[str, Any]:
        """Append one round's line to metrics.jsonl and return it."""
        line = {
            "round": summary.round,
            "attempt": summary.attempt,
            "selected": list(summary.selected),
            "succeeded": list(summary.succeeded),
            "failed": summary.failed,
            "timed_out": list(summary.timed_out),
            "num_examples": summary.num_examples,
            "train_metrics": summary.train_metrics,
            "evaluate_metrics": evaluate,
            "collect_seconds": round(summary.closed_at - summary.dispatched_at, 6),
            "aggregate_seconds": round(aggregate_seconds, 6),
            "train_seconds": {k: round(v, 6) for k, v in summary.train_seconds.items()},
            "model_path": str(model_path),
            "written": time.time(),
        }
        if summary.round in self.logged_rounds():
            return line  # written before a restart: one line per round, never two
        append_json_line(self.metrics_path, line)
        self._last_round = line
        if self._rounds_completed is not None:
            self._rounds_completed += 1
        return line


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """The intact lines of a JSON-lines file that carry an int "round"; a torn line is skipped."""
    return [line for line in read_json_lines(path) if isinstance(line.get("round"), int)]
