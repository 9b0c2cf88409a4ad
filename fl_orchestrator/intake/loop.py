"""The intake task: paths from the watcher become events for the round loop.

Each file is looked at once per identity (inode, size, mtime): a rescan that
finds a file already handled costs one lstat. Decoding runs in a worker
thread; refusals are quarantined right here and never reach the round loop.
A refused file that stays where it is keeps its identity in ``seen``, so it
is refused once, not again at every rescan, until it changes.

A sync client may write a download in place (truncate, then write), so an
empty or short file may just be arriving. Such a file is not refused at once:
it is looked at again on its next event, and refused only once it has stayed
the same for ``settle_seconds``. A heartbeat is never quarantined: the next
one replaces it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from fl_orchestrator.core import events as ev
from fl_orchestrator.core.reasons import Reason, printable
from fl_orchestrator.intake.adapter import Settled, WireAdapter
from fl_orchestrator.intake.quarantine import Quarantine
from fl_orchestrator.intake.reader import FileIdentity, Inbound, InboundReader, Refused, ResultHandle
from fl_orchestrator.intake.watcher import PathBatch
from fl_orchestrator.wire.layout import FileKind
from fl_orchestrator.wire.messages import HeartbeatMessage, ResultMessage

log = structlog.get_logger("fl_orchestrator.intake")

# Reasons a file being written in place (truncate, then write) can give for a while.
_MAYBE_PARTIAL = frozenset({Reason.EMPTY_FILE, Reason.TRUNCATED})
# Larger batches (rescans) are pre-filtered off the event loop.
_INLINE_BATCH = 64


class IntakeLoop:
    """Turns watched paths into NodeSeen and ResultReceived events, for any wire protocol."""

    def __init__(
        self,
        wire: WireAdapter,
        reader: InboundReader,
        quarantine: Quarantine,
        clock: Callable[[], float],
        settle_seconds: float = 2.0,
    ) -> None:
        self.wire = wire
        self.reader = reader
        self.quarantine = quarantine
        self.clock = clock
        self.settle_seconds = settle_seconds
        self.seen: dict[Path, FileIdentity] = {}
        # Files that looked partial: their state (identity and parts) and since when it held.
        self.unsettled: dict[Path, tuple[object, float]] = {}
        # For results written as parts: the parts as they were when the result was handled.
        self.parts_seen: dict[Path, tuple[tuple[str, int, int], ...]] = {}

    async def run(self, batches: ObjectReceiveStream[PathBatch], events: ObjectSendStream[ev.Event]) -> None:
        """Consume path batches until the watcher closes; look again at unsettled files when due."""
        while True:
            due = min((since + self.settle_seconds for _, since in self.unsettled.values()), default=math.inf)
            batch: PathBatch | None = None
            with anyio.move_on_after(max(0.0, due - time.monotonic())):
                try:
                    batch = await batches.receive()
                except anyio.EndOfStream:
                    return
            if batch is None:
                batch = sorted(self.unsettled)
            elif len(batch) > _INLINE_BATCH:
                # A rescan: thousands of lstat calls would stall the loop, so filter in a thread.
                batch = await anyio.to_thread.run_sync(self._changed, batch)
            for path in batch:
                for event in await self.take(path):
                    await events.send(event)

    async def take(self, path: Path) -> list[ev.Event]:
        """Look at one path; return its events (none if it is nothing new)."""
        path = self.wire.look_at(path)
        classified = self.wire.classify(path)
        if classified is None or classified.kind == FileKind.IGNORED:
            return []  # not this job's, or a write still under a temp name
        try:
            info = os.lstat(path)
        except OSError:
            self.unsettled.pop(path, None)
            return []  # gone already: a later event or rescan will say if it comes back
        identity = FileIdentity(info.st_ino, info.st_size, info.st_mtime_ns)
        parts = self.wire.parts_signature(path) if classified.kind == FileKind.RESULT else ()
        if self.seen.get(path) == identity and self.parts_seen.get(path, ()) == parts:
            self.unsettled.pop(path, None)
            return []
        outcome = await anyio.to_thread.run_sync(
            self.wire.read, path, classified, self.reader, abandon_on_cancel=True
        )
        if isinstance(outcome, Settled):
            self.unsettled.pop(path, None)
            if outcome.identity is not None:
                self.seen[path] = outcome.identity
            return []
        if isinstance(outcome, Refused):
            if self._still_arriving(path, classified.kind, outcome, (identity, parts)):
                return []
            self.unsettled.pop(path, None)
            await self.refuse(path, outcome.datasite, outcome.reason, outcome.detail, identity)
            self._remember_parts(path, parts)
            return []
        self.unsettled.pop(path, None)
        self.seen[path] = outcome.identity
        self._remember_parts(path, parts)
        if outcome.refusal is not None:
            # Unusable, yet it answers a request of ours: quarantined, and counted as a failure.
            await self.refuse(path, outcome.datasite, *outcome.refusal, outcome.identity)
        if outcome.clipped:
            message = outcome.message
            log.warning(
                "result.clipped",
                datasite=outcome.datasite,
                round=message.envelope.round,
                path=printable(str(path), 4096),
                update_norm=outcome.update_norm,
                max_update_norm=self.reader.limits.max_update_norm,
            )
        event = self.event_for(outcome)
        if outcome.alive and isinstance(event, ev.ResultReceived):
            return [ev.NodeSeen(event.now, outcome.datasite), event]
        return [event]

    def _changed(self, batch: PathBatch) -> PathBatch:
        """The paths whose identity differs from the one already handled."""
        changed = []
        for path in batch:
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if self.seen.get(path) != FileIdentity(info.st_ino, info.st_size, info.st_mtime_ns):
                changed.append(path)
        return changed

    def _remember_parts(self, path: Path, parts: tuple[tuple[str, int, int], ...]) -> None:
        if parts:
            self.parts_seen[path] = parts
        else:
            self.parts_seen.pop(path, None)

    def _still_arriving(self, path: Path, kind: FileKind, outcome: Refused, state: object) -> bool:
        """True if this refusal may only mean the file (or one of its parts) is still being written."""
        if outcome.reason not in _MAYBE_PARTIAL:
            return False
        if kind == FileKind.HEARTBEAT:
            return True  # never quarantined: the next heartbeat replaces it
        now = time.monotonic()
        earlier = self.unsettled.get(path)
        if earlier is None or earlier[0] != state:
            # New, or changed since (a part arrived): the settle time starts again.
            self.unsettled[path] = (state, now)
            return True
        return now - earlier[1] < self.settle_seconds

    def event_for(self, inbound: Inbound) -> ev.Event:
        """The machine's view of a decoded file."""
        message = inbound.message
        now = self.clock()
        if isinstance(message, HeartbeatMessage):
            # The file's mtime, not the moment we read it: a heartbeat left behind
            # by a datasite that died before our restart must not count as fresh.
            return ev.NodeSeen(now, inbound.datasite, seen_at=inbound.identity.mtime_ns / 1e9)
        assert isinstance(message, ResultMessage)
        env = message.envelope
        return ev.ResultReceived(
            now=now,
            datasite=inbound.datasite,
            round=env.round,
            reply_to=env.reply_to,
            ok=message.ok,
            num_examples=message.num_examples,
            metrics=message.metrics,
            error_type=message.error_type,
            error_message=message.error_message,
            payload=ResultHandle(inbound.path, inbound.identity, inbound.sha256, message),
            purpose=message.action,
        )

    async def refuse(
        self, path: Path, datasite: str, reason: Reason, detail: str, identity: FileIdentity | None = None
    ) -> None:
        """Quarantine one file; if it stays where it is, remember it so it is refused only once.

        ``identity`` is that of the refused file (default: the one recorded
        when it was decoded, for refusals by the round machine). It is never
        taken afresh after the move: by then the honest answer may already
        sit at the same path, and it must still be read.
        """
        moved = await anyio.to_thread.run_sync(
            lambda: self.quarantine.refuse(path, datasite, reason, detail, root=self.wire.datasites_dir)
        )
        keep = identity or self.seen.get(path)
        stays = moved is None or self.quarantine.keep_originals
        if stays and keep is not None:
            self.seen[path] = keep
        else:
            self.seen.pop(path, None)
