"""The quarantine's records read back at start: counts that survive a restart, and files not to refuse twice.

Every refusal writes one record line (intake/quarantine.py). A refused file that
stays where it was (copy mode, a record-only refusal, a move that failed) used
to be found again by the first rescan after a restart and refused again, so the
status said "rejected 132" for files long gone or long dealt with. The records
say what was refused and, for such files, the identity they had then; a file
at that path with that identity is the same file, and is skipped. The counts
per datasite and reason start from the records, not from zero. Records past a
datasite's share are rotated away, so counts older than ``records.1.jsonl`` are
not in them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fl_orchestrator.intake.quarantine_files import OLDER_RECORDS, RECORDS
from fl_orchestrator.intake.safe_read import FileIdentity
from fl_orchestrator.storage.jsonl import read_json_lines

UNKNOWN_DATASITES = "_unknown"


@dataclass
class Ledger:
    """What the records say: refusals per datasite and reason, and the files refused in place."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    stayed: dict[Path, FileIdentity] = field(default_factory=dict)
    records: int = 0


def read_ledger(directory: Path) -> Ledger:
    """Read every bucket's records (older first); a torn or foreign line is skipped."""
    ledger = Ledger()
    try:
        buckets = sorted(p for p in directory.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return ledger
    for bucket in buckets:
        for name in (OLDER_RECORDS, RECORDS):
            for record in read_json_lines(bucket / name, on_torn=lambda _number, _text: None):
                _add(ledger, record)
    return ledger


def _add(ledger: Ledger, record: dict[str, object]) -> None:
    reason, datasite, source = record.get("reason"), record.get("datasite"), record.get("source")
    if not isinstance(reason, str) or not isinstance(datasite, str):
        return
    bucket = UNKNOWN_DATASITES if reason == "unknown_datasite" else datasite
    per_site = ledger.counts.setdefault(bucket, {})
    per_site[reason] = per_site.get(reason, 0) + 1
    ledger.records += 1
    identity = _identity(record.get("identity"))
    if record.get("stays") and isinstance(source, str) and identity is not None:
        ledger.stayed[Path(source)] = identity


def _identity(value: object) -> FileIdentity | None:
    if not isinstance(value, list) or len(value) != 3:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    return FileIdentity(value[0], value[1], value[2])
