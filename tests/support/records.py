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
    """The daemon's quarantine records (``<state>/quarantine/**/*.reason.json``), parsed."""
    folder = state_dir / "quarantine"
    records: list[dict[str, Any]] = []
    for path in sorted(folder.rglob("*.reason.json")) if folder.exists() else []:
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            records.append({"source": str(path), "reason": "unreadable record"})
    return records
