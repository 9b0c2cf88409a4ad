"""Quarantine: refused files are kept out of the way, with their reason recorded.

Every refusal is one ``file.rejected`` log line (intake/refusal_log.py: at
most a burst per datasite per second, the rest counted in a summary line),
one line in ``<state_dir>/quarantine/<datasite>/records.jsonl`` and one count
per datasite and reason. The file itself is kept next to its record when that
is safe:

- a small file whose bytes the reader already has is written from memory:
  the copy is the bytes that were judged, and nothing is opened in the
  datasite's folder again;
- otherwise the move is a rename relative to the file's folder, opened
  without following links from the datasites root down, so a symlink is
  moved as the link itself and no link on the path can redirect the move;
- a directory, a file under a symlinked folder, and anything in the folder
  of a datasite that is not in the job are only recorded: moving a tree or
  writing into a stranger's folder is not ours to do;
- across filesystems a regular file of at most 64 MiB is copied (through a
  descriptor opened without following links) and then unlinked; anything
  bigger is recorded, so a 2 GiB bomb never fills the state folder.

Kept files take at most ``max_bytes`` in all, in equal shares. A datasite's
records file is started afresh once it holds as much as its share (the
previous one is kept as ``records.1.jsonl``), so records are bounded too.

A datasite whose files are refused ``flag_after`` times in a row, with no
counted result in between, is flagged (``datasite.flagged``) until the
daemon calls ``counted`` for it again.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from fl_orchestrator.core.reasons import Reason, printable
from fl_orchestrator.intake.ledger import UNKNOWN_DATASITES
from fl_orchestrator.intake.quarantine_files import (
    OLDER_RECORDS,
    RECORDS,
    Moved,
    move_aside,
    safe_name,
    usage_on_disk,
)
from fl_orchestrator.intake.refusal_log import RefusalLog
from fl_orchestrator.intake.safe_read import FileIdentity
from fl_orchestrator.storage.jsonl import append_whole, json_text
from fl_orchestrator.storage.retry import StateWriteError, WriteRetry

log = structlog.get_logger("fl_orchestrator.quarantine")

# Refusals of files from folders that are not datasites of the job are counted
# and recorded under this one name: there is no '@' in it, so no datasite has
# it, and a flood of made-up folders cannot grow status.json without bound.
# A records file is started afresh past max(its datasite's share, this).
RECORDS_MIN_BYTES = 1024 * 1024
_TIMING_REASONS = frozenset({Reason.ROUND_CLOSED, Reason.UNKNOWN_ROUND})


@dataclass
class Quarantine:
    """state_dir/quarantine/<datasite>/<stamp>-<token>-<reason>-<name>, and records.jsonl beside them."""

    directory: Path
    flag_after: int = 5
    # Under real sync a refused file lives in another party's datasite: moving
    # it makes our client try to delete it upstream (refused), then fetch it
    # again. With keep_originals the file is copied and left where it is.
    keep_originals: bool = False
    # Record writes are retried like every state write; None: one try (tools, tests).
    retry: WriteRetry | None = None
    # Disk the kept files may take, in equal shares of ``shares`` (datasites + strangers).
    max_bytes: int = 256 * 1024 * 1024
    shares: int = 1
    used: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    _usage_loaded: bool = field(default=False, repr=False, compare=False)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    streaks: dict[str, int] = field(default_factory=dict)
    flagged: set[str] = field(default_factory=set)
    lines: RefusalLog = field(default_factory=RefusalLog, repr=False, compare=False)
    # refuse() runs in worker threads (intake and round loop may overlap) while
    # status.json is written from another: counters change under this lock.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def refuse(
        self,
        path: Path,
        datasite: str,
        reason: Reason,
        detail: str,
        *,
        root: Path | None = None,
        content: bytes | None = None,
        identity: FileIdentity | None = None,
        **context: object,
    ) -> Path | None:
        """Log, count, record and (if safe) keep one refused file; return where it was kept.

        ``root`` is the datasites folder: links are not followed below it.
        Without it no link is followed anywhere on the path. ``content`` is
        the file's bytes as the reader read them, if it has them: in copy
        mode they are kept without opening the file again. ``identity`` is
        the file's as it was judged: recorded, so that a restart does not
        refuse the same file again (intake/ledger.py). Raises nothing
        but StateWriteError, when the record could not be written for
        ``write_retry_seconds``.
        """
        unknown = reason == Reason.UNKNOWN_DATASITE
        bucket = UNKNOWN_DATASITES if unknown else datasite
        # Lateness is not misbehaviour: a slow datasite's late answers do not flag it.
        track = not unknown and reason not in _TIMING_REASONS
        newly_flagged, streak = self._count(bucket, reason, track=track)
        folder = self.directory / safe_name(bucket, 128)
        stem = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}-{reason}"
        stem = f"{stem}-{safe_name(path.name, 80)}"
        inline: str | None = None
        try:
            if content is not None and self.keep_originals and not unknown:
                moved, inline = self._keep_inline(content, folder.name)
            else:
                moved = move_aside(
                    path,
                    folder,
                    stem,
                    root or Path(path.anchor or "/"),
                    record_only=unknown,
                    copying=self.keep_originals,
                    reserve=lambda cost: None if self._reserve(folder.name, cost) else self._over_share(),
                )
        except Exception as exc:  # never let bookkeeping of a refusal stop the daemon
            moved = Moved(None, "unknown", f"{type(exc).__name__}: {exc}")
        record = {
            "source": printable(str(path), 4096),
            "datasite": printable(datasite, 256),
            "reason": str(reason),
            "detail": detail,
            "what": moved.what,
            "size": moved.size,
            "link_target": moved.link_target,
            "moved_to": str(moved.to) if moved.to else None,
            "move_error": moved.error,
            "content_base64": inline,
            "at": time.time(),
            # Left where it was: the ledger skips this very file after a restart.
            "stays": self.keep_originals or unknown or moved.to is None,
            "identity": [identity.inode, identity.size, identity.mtime_ns] if identity else None,
        }
        record_error = self._write_record(folder, (json_text(record, sort_keys=True) + "\n").encode())
        self.lines.rejected(
            printable(datasite, 256),
            str(reason),
            None if record_error else str(folder / RECORDS),
            datasite=printable(datasite, 256),
            detail=detail,
            path=printable(str(path), 4096),
            what=moved.what,
            quarantined_to=str(moved.to) if moved.to else None,
            move_error=moved.error,
            kept_in_record=inline is not None,
            record_error=record_error,
            consecutive_rejections=streak,
            **context,
        )
        if newly_flagged:
            log.warning(
                "datasite.flagged",
                datasite=datasite,
                consecutive_rejections=streak,
                last_reason=str(reason),
                hint="its files keep being refused; see quarantine/ and the file.rejected events",
                **context,
            )
        return moved.to

    def flush_log(self, *, final: bool = False) -> None:
        """Log the refusals that were only counted so far (call when the intake runs dry).

        ``final``: the intake stopped, and any refusal still to come is logged in full.
        """
        self.lines.flush(lambda bucket: str(self.directory / safe_name(bucket, 128) / RECORDS), final=final)

    def _write_record(self, folder: Path, line: bytes) -> str | None:
        """Append one record line, retried like every state write; return why it was not written."""
        try:
            if self.retry is None:
                self._append_record(folder, line)
            else:
                self.retry.run_blocking(
                    lambda: self._append_record(folder, line), what="quarantine record", path=folder / RECORDS
                )
        except StateWriteError:
            raise  # the disk stayed unwritable: the daemon exits 74, as for any state write
        except Exception as exc:
            return f"record not written: {type(exc).__name__}: {exc}"
        return None

    def _append_record(self, folder: Path, line: bytes) -> None:
        path = folder / RECORDS
        try:
            size = os.lstat(path).st_size
        except FileNotFoundError:
            size = 0
        if size + len(line) > max(self.share_bytes, RECORDS_MIN_BYTES):
            os.replace(path, folder / OLDER_RECORDS)
            log.info("quarantine.records_started_afresh", folder=str(folder), kept=OLDER_RECORDS)
        append_whole(path, line, durable=False)

    def _keep_inline(self, content: bytes, bucket: str) -> tuple[Moved, str | None]:
        """Keep a small refused file's bytes, as read, in its record (base64); None if over the share.

        Not a file of its own: a flood of tiny files would cost an inode each,
        which the byte share does not bound, and creating them was the
        slowest step of a refusal on a busy disk.
        """
        done = Moved(None, "file", None, None, len(content))
        if not self._reserve(bucket, len(content)):
            return dataclasses.replace(done, error=self._over_share()), None
        return done, base64.b64encode(content).decode("ascii")

    def _over_share(self) -> str:
        return (
            f"this datasite's share of quarantine_max_bytes ({self.share_bytes} bytes) is used up:"
            " recorded, not kept"
        )

    def counted(self, datasite: str) -> None:
        """A result of ``datasite`` was counted by the round: its streak of refusals ends."""
        with self._lock:
            self.streaks.pop(datasite, None)
            was_flagged = datasite in self.flagged
            self.flagged.discard(datasite)
        if was_flagged:
            log.info("datasite.unflagged", datasite=datasite)

    @property
    def share_bytes(self) -> int:
        """What one datasite's refused files may take."""
        return self.max_bytes // max(self.shares, 1)

    def _reserve(self, bucket: str, cost: int) -> bool:
        """Count ``cost`` bytes against a bucket's share; False (and a drop counted) if over it."""
        with self._lock:
            if not self._usage_loaded:
                self.used = usage_on_disk(self.directory)
                self._usage_loaded = True
            if self.used.get(bucket, 0) + cost > self.share_bytes:
                self.dropped[bucket] = self.dropped.get(bucket, 0) + 1
                return False
            self.used[bucket] = self.used.get(bucket, 0) + cost
            return True

    def restore_counts(self, counts: dict[str, dict[str, int]]) -> None:
        """Start the per-datasite, per-reason counts from the records of earlier runs (the ledger)."""
        with self._lock:
            for site, reasons in counts.items():
                per_site = self.counts.setdefault(site, {})
                for reason, count in reasons.items():
                    per_site[reason] = per_site.get(reason, 0) + count

    def snapshot_dropped(self) -> dict[str, int]:
        """Refused files not kept because their datasite's share was used up, per bucket."""
        with self._lock:
            return dict(self.dropped)

    def snapshot_counts(self) -> dict[str, dict[str, int]]:
        """A copy of the per-datasite, per-reason counts, safe to serialise in another thread."""
        with self._lock:
            return {site: dict(reasons) for site, reasons in self.counts.items()}

    def flagged_datasites(self) -> list[str]:
        """The flagged datasites, sorted (for status.json)."""
        with self._lock:
            return sorted(self.flagged)

    def _count(self, bucket: str, reason: Reason, *, track: bool) -> tuple[bool, int]:
        with self._lock:
            per_site = self.counts.setdefault(bucket, {})
            per_site[str(reason)] = per_site.get(str(reason), 0) + 1
            if not track:
                return False, 0
            streak = self.streaks.get(bucket, 0) + 1
            self.streaks[bucket] = streak
            if streak >= self.flag_after and bucket not in self.flagged:
                self.flagged.add(bucket)
                return True, streak
            return False, streak
