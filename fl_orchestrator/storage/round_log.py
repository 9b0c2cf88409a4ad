"""The round log: an append-only, fsynced record of what a round decided.

One file per round, ``state_dir/rounds/rNNNNN.log``, one JSON object per line
with a CRC32 of its payload. It holds exactly what cannot be recomputed after
a crash: the dispatch (selection, task ids, deadline), every result the
machine counted (in the order it counted them) and the instant a round closed
on its deadline. A torn last line (kill -9 mid-write) is ignored on read; a
bad CRC anywhere else is reported.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from fl_orchestrator.storage import failpoints
from fl_orchestrator.storage.jsonl import append_whole

log = structlog.get_logger("fl_orchestrator.round_log")


@dataclass(frozen=True)
class DispatchRecord:
    """An attempt was dispatched."""

    attempt: int
    tasks: dict[str, str]
    dispatched_at: float
    deadline: float


@dataclass(frozen=True)
class ResultRecord:
    """The machine counted this result (accepted or failed)."""

    attempt: int
    datasite: str
    reply_to: str
    ok: bool
    num_examples: int
    metrics: dict[str, int | float]
    error_type: str | None
    error_message: str | None
    path: str
    identity: tuple[int, int, int]
    at: float
    # Of the bytes that were validated; None in logs written before it was recorded.
    sha256: str | None = None
    # ||result - the round's model||, for the outlier rule's reference after a restart.
    update_norm: float | None = None


@dataclass(frozen=True)
class CloseRecord:
    """The attempt closed on its deadline at ``at``."""

    attempt: int
    at: float


Record = DispatchRecord | ResultRecord | CloseRecord
_TYPES: dict[str, type[Any]] = {"dispatch": DispatchRecord, "result": ResultRecord, "close": CloseRecord}
_NAMES = {cls: name for name, cls in _TYPES.items()}


@dataclass
class RoundLog:
    """Appends to and reads one round's log."""

    directory: Path
    round: int
    _checked: bool = field(default=False, repr=False)

    @property
    def path(self) -> Path:
        """This round's log file."""
        return self.directory / f"r{self.round:05d}.log"

    def append(self, record: Record) -> None:
        """Append one record durably (write + fsync) before returning.

        A failed append leaves the log as it was (jsonl.append_whole), so
        retrying it never records a decision twice.
        """
        payload = {"type": _NAMES[type(record)], **record.__dict__}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        line = json.dumps({"crc": zlib.crc32(text.encode()), "rec": text}, separators=(",", ":")) + "\n"
        if not self._checked:
            if self.path.exists():
                _drop_torn_tail(self.path)
            self._checked = True
        failpoints.hit("round_log.before_append")
        append_whole(self.path, line.encode())
        failpoints.hit("round_log.after_append")

    def close(self) -> None:
        """Nothing stays open between appends; kept for callers that close logs."""

    def read(self) -> list[Record]:
        """Every intact record in order; a torn final line is dropped."""
        return list(read_records(self.path))


def _intact(line: bytes) -> bool:
    try:
        outer = json.loads(line)
        return bool(zlib.crc32(outer["rec"].encode()) == outer["crc"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line left by a crash, so new appends start on a clean line."""
    data = path.read_bytes()
    keep = 0
    for line in data.split(b"\n")[:-1]:
        if not _intact(line):
            break
        keep += len(line) + 1
    if keep != len(data):
        log.warning("round_log.truncated_tail", path=str(path), dropped_bytes=len(data) - keep)
        with open(path, "r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())


def read_records(path: Path) -> Iterator[Record]:
    """Parse a round log; stop at the first damaged line and say so."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    except FileNotFoundError:
        return
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            outer = json.loads(line)
            text = outer["rec"]
            if zlib.crc32(text.encode()) != outer["crc"]:
                raise ValueError("crc mismatch")
            payload = json.loads(text)
            cls = _TYPES[payload.pop("type")]
            if cls is ResultRecord:
                payload["identity"] = tuple(payload["identity"])
            yield cls(**payload)
        except (ValueError, KeyError, TypeError) as exc:
            last = number == len(lines) or (number == len(lines) - 1 and not lines[-1])
            if last:
                log.warning("round_log.torn_tail", path=str(path), line=number)
            else:
                log.error("round_log.damaged", path=str(path), line=number, error=str(exc))
            return
