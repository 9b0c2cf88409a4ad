"""The intake task: paths from the watcher become events for the round loop, for any protocol.

Paths wait in a fair queue, one per datasite, served in turn: a datasite that
floods its folder delays only itself. They are read in batches, one
worker-thread hop for many junk files, and a hop ends at the first decoded
result, so no two decoded models wait in memory. The protocol's adapter
(intake/adapter.py) says what a path is and how its bytes become a result.

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
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog
from anyio.abc import ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream

from fl_orchestrator.core import events as ev
from fl_orchestrator.core.reasons import Reason, printable
from fl_orchestrator.intake.adapter import Outcome, Settled, WireAdapter, event_of, presence_first
from fl_orchestrator.intake.fair_queue import FairQueue
from fl_orchestrator.intake.fold_gate import FoldGate
from fl_orchestrator.intake.quarantine import Quarantine
from fl_orchestrator.intake.reader import Inbound, InboundReader, Refused
from fl_orchestrator.intake.safe_read import FileIdentity
from fl_orchestrator.intake.unlisted import UnlistedLog, unlisted_presence
from fl_orchestrator.intake.watcher import PathBatch
from fl_orchestrator.wire.layout import Classified, FileKind
from fl_orchestrator.wire.messages import ResultMessage

log = structlog.get_logger("fl_orchestrator.intake")

# Marks a read whose refusal (if any) was left to the event loop's settle logic.
_NOT_YET = object()
# Reasons a file being written in place (truncate, then write) can give for a while.
_MAYBE_PARTIAL = frozenset({Reason.EMPTY_FILE, Reason.TRUNCATED})
# Refusals the worker thread leaves to the event loop: maybe partial, or the file is gone.
_NOT_FINAL = _MAYBE_PARTIAL | {Reason.VANISHED}
# Larger batches (rescans) are pre-filtered off the event loop.
_INLINE_BATCH = 64
# Paths one party may have waiting; batches queued between two takes; how often a drop is logged.
PER_DATASITE_QUEUE = 10_000
# Paths read in one worker-thread hop (a hop also ends at the first decoded result).
PATHS_PER_HOP = 32
_BATCHES_PER_TURN = 64
_DROP_LOG_EVERY = 1000


@dataclass(frozen=True)
class _Pending:
    """A path worth reading, as the cheap checks found it."""

    path: Path
    classified: Classified
    identity: FileIdentity
    parts: tuple[tuple[str, int, int], ...]


class IntakeLoop:
    """Turns watched paths into NodeSeen and ResultReceived events, for any wire protocol."""

    def __init__(
        self,
        wire: WireAdapter,
        reader: InboundReader,
        quarantine: Quarantine,
        clock: Callable[[], float],
        settle_seconds: float = 2.0,
        unlisted_log_seconds: float = 60.0,
        fold_wait_seconds: float = 600.0,
    ) -> None:
        self.wire = wire
        self.reader = reader
        self.quarantine = quarantine
        self.clock = clock
        self.settle_seconds = settle_seconds
        self.fold_gate = FoldGate(fold_wait_seconds)
        # A datasite outside the job that writes heartbeats: said once per this many seconds.
        self.unlisted = UnlistedLog(unlisted_log_seconds)
        self.seen: dict[Path, FileIdentity] = {}
        # Files that looked partial: their state (identity and parts) and since when it held.
        self.unsettled: dict[Path, tuple[object, float]] = {}
        # For results written as parts: the parts as they were when the result was handled.
        self.parts_seen: dict[Path, tuple[tuple[str, int, int], ...]] = {}
        self.queue = FairQueue(PER_DATASITE_QUEUE)
        # Called after files were refused (status.json shows the counts without a round event).
        self.on_refused: Callable[[], None] | None = None
        # The earliest moment an unsettled file is due to be looked at again.
        self._next_due = math.inf
        self._stopping = threading.Event()

    async def run(
        self, batches: MemoryObjectReceiveStream[PathBatch], events: ObjectSendStream[ev.Event]
    ) -> None:
        """Consume path batches until the watcher closes; look again at unsettled files when due.

        Paths wait in a fair queue (intake/fair_queue.py): whatever has arrived
        is queued before each path is taken, and parties take turns.
        """
        try:
            await self._serve(batches, events)
        finally:
            # A hop left running in its thread stops at its next file, and what was
            # refused and only counted is logged: a stop leaves no refusal untold.
            self._stopping.set()
            self.quarantine.flush_log(final=True)

    async def _serve(
        self, batches: MemoryObjectReceiveStream[PathBatch], events: ObjectSendStream[ev.Event]
    ) -> None:
        while True:
            await self._queue_again_after_overflow()
            if not self.queue:
                self.quarantine.flush_log()  # run dry: the refusals only counted so far are logged
                with anyio.move_on_after(max(0.0, self._next_due - time.monotonic())):
                    try:
                        await self._queue(await batches.receive())
                    except anyio.EndOfStream:
                        return
            if not await self._queue_arrived(batches):
                return
            self._queue_due()
            # In turn from every party with work: a flood only delays the flooder.
            paths: list[Path] = []
            for _ in range(PATHS_PER_HOP):
                path = self.queue.pop()
                if path is None:
                    break
                paths.append(path)
            await self.take_many(paths, events.send, one_result_in_hand=True)

    async def _queue_arrived(self, batches: MemoryObjectReceiveStream[PathBatch]) -> bool:
        """Queue every batch already waiting, without waiting for more; False once the watcher ended."""
        for _ in range(_BATCHES_PER_TURN):
            try:
                batch = batches.receive_nowait()
            except anyio.WouldBlock:
                return True
            except anyio.EndOfStream:
                return bool(self.queue)
            await self._queue(batch)
        return True

    async def _queue(self, batch: PathBatch) -> None:
        if len(batch) > _INLINE_BATCH:
            # A rescan: thousands of lstat calls would stall the loop, so filter in a thread.
            batch = await anyio.to_thread.run_sync(self._changed, batch)
        for looked in batch:
            path = self.wire.look_at(looked)
            classified = self.wire.classify(path)
            wanted = classified is not None and classified.kind != FileKind.IGNORED
            if wanted and classified is not None and not self.queue.push(classified.datasite, path):
                self._note_dropped(classified.datasite)

    async def _queue_again_after_overflow(self) -> None:
        """A datasite whose queue overflowed and has run dry: its folder is listed again now.

        Without it, what did not fit would wait for the next rescan.
        """
        for datasite in self.queue.drained_overflowed():
            await self._queue(await anyio.to_thread.run_sync(self._listed, datasite))

    def _listed(self, datasite: str) -> PathBatch:
        return list(self.wire.scan((datasite,)))

    def _queue_due(self) -> None:
        """Files that looked partial and have now been still for the settle time: look again."""
        now = time.monotonic()
        if now < self._next_due:
            return  # checked once per due time, not at every path: a flood makes many unsettled
        self._next_due = math.inf
        for path, (_, since) in list(self.unsettled.items()):
            due = since + self.settle_seconds
            if due > now:
                self._next_due = min(self._next_due, due)
            elif path not in self.queue:
                classified = self.wire.classify(path)
                if classified is not None:
                    self.queue.push(classified.datasite, path)

    def _note_dropped(self, datasite: str) -> None:
        dropped = self.queue.dropped.get(datasite, 0)
        if dropped and dropped % _DROP_LOG_EVERY == 1:
            log.warning(
                "intake.queue_full",
                datasite=datasite,
                dropped=dropped,
                queued=self.queue.per_party_limit,
                hint="its folder is listed again once its queue has run dry",
            )

    async def take(self, path: Path) -> list[ev.Event]:
        """Look at one path; return its events (none if it is nothing new)."""
        found: list[ev.Event] = []

        async def keep(event: ev.Event) -> None:
            found.append(event)

        await self.take_many([path], keep)
        return found

    def result_done(self) -> None:
        """The round loop is done with the decoded result sent last (folded or refused)."""
        self.fold_gate.release()

    async def take_many(
        self,
        paths: list[Path],
        send: Callable[[ev.Event], Awaitable[None]],
        *,
        one_result_in_hand: bool = False,
    ) -> None:
        """Look at these paths, reading them in as few worker-thread hops as results allow.

        Junk is read and refused in one hop for the lot; a hop ends after the
        first decoded result, which is sent before the next is read, so no two
        decoded models wait in memory at once. With ``one_result_in_hand`` (the
        daemon, whose round loop calls result_done) the next result is not even
        read before the last is let go (intake/fold_gate.py).
        """
        ready = [item for item in map(self._prepare, paths) if item is not None]
        while ready:
            if one_result_in_hand and _may_decode(ready):
                await self.fold_gate.passed()
            ready = await self._hop(ready, send, one_result_in_hand)

    async def _hop(
        self, ready: list[_Pending], send: Callable[[ev.Event], Awaitable[None]], one_result_in_hand: bool
    ) -> list[_Pending]:
        """Read, finish and send one hop's files; return those left. A decoded result's locals end here."""
        done = await anyio.to_thread.run_sync(self._read_batch, ready, abandon_on_cancel=True)
        events: list[ev.Event] = []
        for item, (outcome, moved) in zip(ready, done, strict=False):
            events += await self._finish(item, outcome, moved)
        for event in presence_first(events):
            if one_result_in_hand and isinstance(event, ev.ResultReceived):
                self.fold_gate.close()
            await send(event)
        return ready[len(done) :]

    def _prepare(self, path: Path) -> _Pending | None:
        """What to read for a path, or None if it is not ours or nothing new (cheap checks only)."""
        path = self.wire.look_at(path)
        classified = self.wire.classify(path)
        if classified is None or classified.kind == FileKind.IGNORED:
            return None  # not this job's, or a write still under a temp name
        try:
            info = os.lstat(path)
        except OSError:
            self.unsettled.pop(path, None)
            return None  # gone already: a later event or rescan will say if it comes back
        identity = FileIdentity(info.st_ino, info.st_size, info.st_mtime_ns)
        parts = self.wire.parts_signature(path) if classified.kind == FileKind.RESULT else ()
        if self.seen.get(path) == identity and self.parts_seen.get(path, ()) == parts:
            self.unsettled.pop(path, None)
            return None
        return _Pending(path, classified, identity, parts)

    def _read_batch(self, items: list[_Pending]) -> list[tuple[Outcome, object]]:
        """In the worker thread: read (and refuse) items in order, up to the first decoded result."""
        done: list[tuple[Outcome, object]] = []
        for item in items:
            if self._stopping.is_set():
                break
            outcome, moved = self._read_and_refuse(item.path, item.classified, item.identity)
            done.append((outcome, moved))
            if isinstance(outcome, Inbound) and isinstance(outcome.message, ResultMessage):
                break
        return done

    async def _finish(self, item: _Pending, outcome: Outcome, moved: object) -> list[ev.Event]:
        """Back in the event loop: remember what was seen, and the events for the round loop."""
        path, identity, parts = item.path, item.identity, item.parts
        if moved is not _NOT_YET:
            # Refused for good in the worker thread already.
            self.unsettled.pop(path, None)
            self._after_refusal(path, identity, moved)
            self._remember_parts(path, parts)
            return []
        if isinstance(outcome, Settled):
            self.unsettled.pop(path, None)
            if outcome.identity is not None:
                self.seen[path] = outcome.identity
            return []
        if isinstance(outcome, Refused) and outcome.reason == Reason.VANISHED:
            self.unsettled.pop(path, None)
            return []  # nothing to refuse: its next event or the rescan says if it comes back
        if unlisted_presence(outcome, item.classified):
            self.seen[path] = identity  # this heartbeat is done with; the next one is looked at
            self.unlisted.say(outcome.datasite)
            return []
        if isinstance(outcome, Refused):
            if self._still_arriving(path, item.classified.kind, outcome, (identity, parts)):
                return []
            self.unsettled.pop(path, None)
            await self.refuse(
                path, outcome.datasite, outcome.reason, outcome.detail, identity, outcome.content
            )
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

    def _read_and_refuse(
        self, path: Path, classified: Classified, identity: FileIdentity
    ) -> tuple[Outcome, object]:
        """Read in the worker thread; quarantine there too a refusal that waiting cannot change."""
        outcome = self.wire.read(path, classified, self.reader)
        if unlisted_presence(outcome, classified):
            return outcome, _NOT_YET  # not a file to refuse: said by the event loop, now and then
        if isinstance(outcome, Refused) and outcome.reason not in _NOT_FINAL:
            moved = self._quarantine(
                path, outcome.datasite, outcome.reason, outcome.detail, outcome.content, identity
            )
            return outcome, moved
        return outcome, _NOT_YET

    def _quarantine(
        self,
        path: Path,
        datasite: str,
        reason: Reason,
        detail: str,
        content: bytes | None = None,
        identity: FileIdentity | None = None,
    ) -> Path | None:
        return self.quarantine.refuse(
            path, datasite, reason, detail, root=self.wire.datasites_dir, content=content, identity=identity
        )

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
            self._next_due = min(self._next_due, now + self.settle_seconds)
            return True
        return now - earlier[1] < self.settle_seconds

    def event_for(self, inbound: Inbound) -> ev.Event:
        """The machine's view of a decoded file, now."""
        return event_of(inbound, self.clock())

    async def refuse(
        self,
        path: Path,
        datasite: str,
        reason: Reason,
        detail: str,
        identity: FileIdentity | None = None,
        content: bytes | None = None,
    ) -> None:
        """Quarantine one file; if it stays where it is, remember it so it is refused only once.

        ``identity`` is that of the refused file (default: the one recorded
        when it was decoded, for refusals by the round machine). It is never
        taken afresh after the move: by then the honest answer may already
        sit at the same path, and it must still be read. ``content``: its
        bytes as read, if the reader kept them.
        """
        judged = identity or self.seen.get(path)
        moved = await anyio.to_thread.run_sync(
            self._quarantine, path, datasite, reason, detail, content, judged
        )
        self._after_refusal(path, identity, moved)

    def _after_refusal(self, path: Path, identity: FileIdentity | None, moved: object) -> None:
        """A refused file that stays where it is is remembered, so it is refused only once."""
        if self.on_refused is not None:
            self.on_refused()
        keep = identity or self.seen.get(path)
        stays = moved is None or self.quarantine.keep_originals
        if stays and keep is not None:
            self.seen[path] = keep
        else:
            self.seen.pop(path, None)


def _may_decode(ready: list[_Pending]) -> bool:
    return any(item.classified.kind == FileKind.RESULT for item in ready)
