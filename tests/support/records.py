"""Reading what a daemon run leaves behind: JSON log lines and quarantine records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def json_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Every line of a file that parses as a JSON object (others are skipped)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            yield value


def quarantine_records(state_dir: Path) -> list[dict[str, Any]]:
    """The daemon's quarantine records (``<state>/quarantine/<bucket>/records*.jsonl``), parsed."""
    return records_under(state_dir / "quarantine")


def records_under(folder: Path) -> list[dict[str, Any]]:
    """Every quarantine record under ``folder``, oldest first within each datasite's folder."""
    records: list[dict[str, Any]] = []
    buckets = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.exists() else []
    for bucket in buckets:
        for name in ("records.1.jsonl", "records.jsonl"):
            records.extend(json_lines(bucket / name))
    return records


def round_line(rnd: int, **overrides: Any) -> dict[str, Any]:
    """A metrics.jsonl line as Reports.append_round writes it: ds0, ds1 answered, ds2 timed out."""
    a, b, c = (f"ds{i}@example.org" for i in range(3))
    line: dict[str, Any] = {
        "round": rnd,
        "attempt": 1,
        "selected": [a, b, c],
        "succeeded": [a, b],
        "failed": {},
        "timed_out": [c],
        "num_examples": 30,
        "train_metrics": {"loss": 1.0 / rnd},
        "evaluate_metrics": {"accuracy": 0.5 + rnd / 10},
        "collect_seconds": 1.0,
        "aggregate_seconds": 0.01,
        "train_seconds": {a: 0.5, b: 0.6},
        "model_path": "/x",
        "written": 1_800_000_000.0,
    }
    line.update(overrides)
    return line
