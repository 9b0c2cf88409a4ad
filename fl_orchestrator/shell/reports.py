"""What the daemon tells the outside world on disk: status.json and metrics.jsonl."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fl_orchestrator.core.events import RoundSummary
from fl_orchestrator.core.machine import RoundMachine
from fl_orchestrator.shell.atomic import atomic_write_text, fsync_dir

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"


class Reports:
    """status.json, rewritten atomically on every transition; metrics.jsonl, one line a round."""

    def __init__(self, state_dir: Path, job: str) -> None:
        self.state_dir = state_dir
        self.job = job
        self.status_path = state_dir / STATUS_FILE
        self.metrics_path = state_dir / METRICS_FILE

    def write_status(
        self, machine: RoundMachine, *, now: float, state: str, extra: dict[str, Any] | None = None
    ) -> None:
        """Snapshot the machine for `fl-orchestrator status`."""
        current = machine.current
        status: dict[str, Any] = {
            "job": self.job,
            "state": state,
            "phase": str(machine.phase),
            "round": min(machine.round, machine.rules.num_rounds),
            "num_rounds": machine.rules.num_rounds,
            "attempt": current.attempt if current else None,
            "deadline": current.deadline if current else machine.wait_until,
            "selected": sorted(current.tasks) if current else [],
            "answered": sorted(current.answered()) if current else [],
            "updated": now,
            "pid": os.getpid(),
            "datasites": {name: asdict(record) for name, record in machine.records.items()},
        }
        if extra:
            status.update(extra)
        atomic_write_text(self.status_path, json.dumps(status, sort_keys=True), durable=False)

    def logged_rounds(self) -> set[int]:
        """Rounds that already have a metrics line."""
        try:
            text = self.metrics_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return set()
        rounds = set()
        for line in text.splitlines():
            try:
                rounds.add(int(json.loads(line)["round"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a crash
        return rounds

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
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if summary.round in self.logged_rounds():
            return line  # written before a restart: one line per round, never two
        with open(self.metrics_path, "a+b") as handle:
            # A crash can leave a torn last line; start ours on a fresh one.
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")
            handle.write((json.dumps(line, sort_keys=True) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(self.state_dir)
        return line
