"""What the processes left: their logs and JSON lines, and the outcome of one server run.

``grep`` reads a log or trace file, whatever state it is in (missing, partly written);
JSON lines and quarantine records are read with ``support.records``. ``ServerRun`` is
what one run of syft-flwr's own server left (its ServerApp's clock ticks, models and final
.npz), ``DaemonRun`` what one run of our daemon left (its JSON log events).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from syftflwr.fedavg import ARRAY_NAMES

# What a DO logs (loguru) when a request gets no usable reply, and what syft-flwr's own
# server logs when a reply is missing or unusable.
DO_LOST_REPLY_MARKERS = (
    "Error loading request",
    "Request expired",
    "Invalid request schema",
    "Failed to deserialize message",
    "Error calling function",
)
SERVER_LOST_REPLY_MARKERS = (
    "Timeout reached",
    "Unexpected error pulling message",
    "Failed to deserialize message",
    "Error loading response",
)


def grep(path: Path, needles: Sequence[str]) -> list[str]:
    """The lines of a file that contain any of the needles."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if any(n in line for n in needles)]


@dataclass
class ServerRun:
    """What one run of syft-flwr's own server left: exit code, times, the models per round."""

    exit_code: int | None
    seconds: float
    trace: list[dict[str, Any]]
    log_path: Path
    final_path: Path

    @property
    def round_seconds(self) -> list[float]:
        """Wall time of each round: between consecutive "after round" clock ticks."""
        ticks = [float(e["time"]) for e in self.trace if e.get("kind") == "round"]
        return [b - a for a, b in itertools.pairwise(ticks)]

    def models(self, names: Sequence[str] = ARRAY_NAMES) -> list[dict[str, np.ndarray]]:
        """The global model before round 1 and after each round (small models only: values traced)."""
        out = []
        for event in (e for e in self.trace if e.get("kind") == "round" and "values" in e):
            out.append(
                {
                    name: np.asarray(values, dtype=np.float64).reshape(shape)
                    for name, values, shape in zip(names, event["values"], event["shapes"], strict=True)
                }
            )
        return out

    def final_model(self) -> dict[str, np.ndarray] | None:
        """The ServerApp's final model (named as the initial .npz); None if no round aggregated."""
        try:
            with np.load(self.final_path, allow_pickle=False) as archive:
                model = {name: np.array(archive[name]) for name in archive.files}
        except (OSError, ValueError):
            return None
        return model or None

    def lost_reply_lines(self) -> list[str]:
        """Server log lines that say a reply was missing or unusable."""
        return grep(self.log_path, SERVER_LOST_REPLY_MARKERS)


@dataclass
class DaemonRun:
    """What one run of our daemon left: exit code, wall time and its JSON log events."""

    exit_code: int | None
    seconds: float
    events: list[dict[str, Any]]
    log_path: Path
    config_path: Path

    def named(self, name: str) -> list[dict[str, Any]]:
        """The events with that name."""
        return [e for e in self.events if e.get("event") == name]

    @property
    def completed(self) -> dict[int, dict[str, Any]]:
        """round.completed by round."""
        return {int(e["round"]): e for e in self.named("round.completed")}

    def log_tail(self, chars: int = 6000) -> str:
        """The end of the daemon's log, for failure messages."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return f"(no daemon log at {self.log_path})"
