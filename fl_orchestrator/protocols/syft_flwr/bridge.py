"""The syft-flwr side of the daemon: watch the owners' app folders, keep presence, stop them.

Runs as one task in the daemon's root task group. Responses are translated
into the spool (replies.py) as soon as watchfiles reports them; a response
that does not parse yet is looked at again on its next event, or once it has
stayed the same for ``settle_seconds``, and only then quarantined. A slow
rescan is the safety net for missed events.

Presence: an owner counts as present once its ``rpc.schema.json`` exists, and
is marked so in the spool every ``heartbeat_interval_seconds`` (a native
heartbeat file, which the ordinary intake reads). An owner with a request
whose deadline passed unanswered is not marked again until it answers (a
restarted owner answers its pending requests first): it stopped answering, so
it is gone.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog
from watchfiles import Change

from fl_orchestrator.core.reasons import Reason, printable
from fl_orchestrator.intake.quarantine import Quarantine
from fl_orchestrator.intake.reader import FileIdentity
from fl_orchestrator.intake.watcher import resilient_awatch, set_when_cancelled
from fl_orchestrator.protocols.syft_flwr.layout import (
    REFUSED_SUFFIX,
    SyftFlwrKind,
    SyftFlwrLayout,
    first_link_below,
)
from fl_orchestrator.protocols.syft_flwr.publisher import SyftFlwrPublisher
from fl_orchestrator.protocols.syft_flwr.replies import (
    NotYet,
    Outcome,
    ReplyTranslator,
    StopAcknowledged,
    SyftFlwrState,
    TornRequest,
    Translated,
    Unusable,
)
from fl_orchestrator.storage.atomic import atomic_write
from fl_orchestrator.wire.layout import JobLayout
from fl_orchestrator.wire.messages import Envelope, HeartbeatMessage, encode_heartbeat

log = structlog.get_logger("fl_orchestrator.protocols.syft_flwr")

NEVER_SEEN_HINT = (
    "no rpc.schema.json of theirs reached this folder: check that each runs the project's main.py"
    " with the same app_name, and, over syftbox 0.4.0, that its rpc/syftperm.yaml grants the"
    " aggregator read on rpc.schema.json (docs/SYFT_FLWR.md)"
)
REFUSED_UPLOAD_HINT = (
    "SyftBox refused to upload the request into {owner}'s folder: the owner has not granted the"
    " aggregator write on rpc/messages/<aggregator>/ (syftbox 0.4.0 reads syftperm.yaml, not the"
    " syft.pub.yaml that syft-event writes); see docs/SYFT_FLWR.md"
)


class Bridge:
    """Moves syft-flwr responses and presence into the spool; sends the stop message."""

    def __init__(
        self,
        *,
        target: SyftFlwrLayout,
        spool: JobLayout,
        owners: tuple[str, ...],
        state: SyftFlwrState,
        publisher: SyftFlwrPublisher,
        translator: ReplyTranslator,
        quarantine: Quarantine,
        settle_seconds: float,
        heartbeat_interval_seconds: float,
        rescan_interval_seconds: float,
        debounce_milliseconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.target = target
        self.spool = spool
        self.owners = owners
        self.state = state
        self.publisher = publisher
        self.translator = translator
        self.quarantine = quarantine
        self.settle_seconds = settle_seconds
        self.heartbeat_interval_seconds = heartbeat_interval_seconds
        self.rescan_interval_seconds = rescan_interval_seconds
        self.debounce_milliseconds = debounce_milliseconds
        self.clock = clock
        self.present: set[str] = set()
        self.seen: dict[Path, FileIdentity] = {}
        self.unsettled: dict[Path, tuple[FileIdentity, float]] = {}
        self.in_flight: set[Path] = set()
        self.stop_reason = "job complete"
        self.stop_pending: set[str] = set()
        self.stops_answered = anyio.Event()
        self.answered = 0
        self._changed = anyio.Event()

    async def run(self) -> None:
        """Watch until cancelled."""
        stop = anyio.Event()
        self.target.datasites_dir.mkdir(parents=True, exist_ok=True)
        async with anyio.create_task_group() as group:
            group.start_soon(set_when_cancelled, stop)
            group.start_soon(self._rescan_forever)
            group.start_soon(self._heartbeat_forever)
            group.start_soon(self._retry_unsettled_forever)
            marker = self.target.marker

            def accept(change: Change, path: str) -> bool:
                return change != Change.deleted and marker in path and not path.endswith(".tmp")

            async for changes in resilient_awatch(
                self.target.datasites_dir,
                stop_event=stop,
                watch_filter=accept,
                debounce=self.debounce_milliseconds,
                step=max(1, self.debounce_milliseconds // 4),
            ):
                await self.look_at(sorted({Path(path) for _, path in changes}))
            group.cancel_scope.cancel()

    async def look_at(self, paths: list[Path]) -> None:
        """Handle a batch of paths that may have changed."""
        for path in paths:
            classified = self.target.classify(path)
            if classified is None or classified.owner not in self.owners:
                continue
            if classified.kind == SyftFlwrKind.PRESENCE:
                await self._presence(classified.owner, path)
            elif classified.kind == SyftFlwrKind.RESPONSE:
                assert classified.request_id is not None
                await self._response(path, classified.owner, classified.request_id.hex)
            elif classified.kind == SyftFlwrKind.REFUSED_UPLOAD:
                assert classified.request_id is not None
                await self._refused_upload(path, classified.owner, classified.request_id.hex)

    async def finish(self, reason: str, *, wait_seconds: float) -> None:
        """Send the stop message to every owner, then wait (bounded) for their answers."""
        self.stop_reason = reason
        never_seen = sorted(set(self.owners) - self.present)
        if never_seen:
            log.warning("syft_flwr.owners_never_seen", owners=never_seen, hint=NEVER_SEEN_HINT)
        # Pending before the first request exists: its answer may come while others are written.
        self.stop_pending = set(self.publisher.stop_targets(self.owners))
        self.stops_answered = anyio.Event()
        sent = await anyio.to_thread.run_sync(self.publisher.send_stop, self.owners, reason)
        log.info("syft_flwr.stop_sent", owners=sorted(sent), reason=reason)
        if not self.stop_pending:
            return
        with anyio.move_on_after(wait_seconds):
            await self.stops_answered.wait()
        if self.stop_pending:
            log.warning(
                "syft_flwr.stop_unanswered", owners=sorted(self.stop_pending), waited_seconds=wait_seconds
            )

    # ---- presence ---------------------------------------------------------------------

    async def _presence(self, owner: str, path: Path) -> None:
        if not os.path.lexists(self.target.schema_path(owner)):
            return
        if owner not in self.present:
            # Before any request: a response in a folder the watch has not reached yet is missed.
            messages = self.target.messages_dir(owner)
            if first_link_below(self.target.datasites_dir, messages / "x") is None:
                await anyio.to_thread.run_sync(lambda: messages.mkdir(parents=True, exist_ok=True))
            self.present.add(owner)
            log.info("syft_flwr.owner_present", owner=owner, schema=str(path))
        if owner not in self.state.overdue_owners(self.clock()):
            await anyio.to_thread.run_sync(self._beat, owner)

    def _beat(self, owner: str) -> None:
        beat = HeartbeatMessage(
            Envelope(self.spool.job, 0, secrets.token_hex(8), None, time.time(), None), "idle"
        )
        path = self.spool.heartbeat_path(owner)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, [encode_heartbeat(beat)], durable=False)

    async def _heartbeat_forever(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval_seconds)
            silent = self.state.overdue_owners(self.clock())
            for owner in sorted(self.present - silent):
                await anyio.to_thread.run_sync(self._beat, owner)

    # ---- responses --------------------------------------------------------------------

    async def _response(self, path: Path, owner: str, request_hex: str) -> None:
        identity = _identity(path)
        if identity is None:
            self.unsettled.pop(path, None)
            return
        if self.seen.get(path) == identity or path in self.in_flight:
            # In flight: the watcher, the retry and the rescan can all name the same file;
            # the first looks at it, and a change meanwhile leaves it unsettled for a retry.
            return
        self.in_flight.add(path)
        try:
            await self._translate_and_settle(path, owner, request_hex, identity)
        finally:
            self.in_flight.discard(path)

    async def _translate_and_settle(
        self, path: Path, owner: str, request_hex: str, identity: FileIdentity
    ) -> None:
        outcome = await anyio.to_thread.run_sync(self.translator.translate, path, owner, request_hex)
        while isinstance(outcome, NotYet):
            # It changed while being read (its event was skipped as in flight): read it again.
            latest = _identity(path)
            if latest is None or latest == identity:
                break
            identity = latest
            outcome = await anyio.to_thread.run_sync(self.translator.translate, path, owner, request_hex)
        if isinstance(outcome, NotYet):
            earlier = self.unsettled.get(path)
            if earlier is None or earlier[0] != identity:
                self.unsettled[path] = (identity, time.monotonic())
                self._changed.set()
                return
            if time.monotonic() - earlier[1] < self.settle_seconds:
                return
            outcome = Unusable(
                Reason.TRUNCATED, f"still incomplete after {self.settle_seconds:g} s: {outcome.detail}"
            )
        self.unsettled.pop(path, None)
        await self._settle(path, owner, request_hex, identity, outcome)

    async def _refused_upload(self, path: Path, owner: str, request_hex: str) -> None:
        """The aggregator's SyftBox client could not upload a request: fail the owner now."""
        identity = _identity(path)
        if identity is None or self.seen.get(path) == identity:
            return
        self.seen[path] = identity
        task_id = self.state.task_for(request_hex)
        failure = await anyio.to_thread.run_sync(
            self.translator.fail_task, owner, task_id, "SyncRefused", REFUSED_UPLOAD_HINT.format(owner=owner)
        )
        log.error(
            "syft_flwr.upload_refused",
            owner=owner,
            request=request_hex,
            counted_as_failure=failure is not None,
            hint=REFUSED_UPLOAD_HINT.format(owner=owner),
        )
        if failure is not None:
            self.state.answered(task_id)

    async def _settle(
        self, path: Path, owner: str, request_hex: str, identity: FileIdentity, outcome: Outcome
    ) -> None:
        if isinstance(outcome, TornRequest):
            # Remove both first: the owner ignores a request that already has a response.
            await anyio.to_thread.run_sync(self._remove_pair, path)
            if outcome.stop:
                resent = await anyio.to_thread.run_sync(
                    self.publisher.resend_stop, outcome.task_id, self.stop_reason
                )
            else:
                resent = await anyio.to_thread.run_sync(self.publisher.resend, outcome.task_id) is not None
            log.warning(
                "syft_flwr.request_resent" if resent else "syft_flwr.request_lost",
                owner=owner,
                request=request_hex,
                stop=outcome.stop,
                why="the owner read it while it was still arriving: " + outcome.detail[:200],
            )
            if not resent and not outcome.stop:
                failure = await anyio.to_thread.run_sync(
                    self.translator.fail_task, owner, outcome.task_id, "SyftRpcStatus400", outcome.detail
                )
                if failure is not None:
                    self.state.answered(outcome.task_id)
            return
        if isinstance(outcome, StopAcknowledged):
            await anyio.to_thread.run_sync(self._remove_pair, path)
            if outcome.status_code == 200:
                log.info("syft_flwr.stopped", owner=owner)
            else:
                log.warning(
                    "syft_flwr.stop_refused", owner=owner, status=outcome.status_code, detail=outcome.detail
                )
            self.stop_pending.discard(owner)
            if not self.stop_pending:
                self.stops_answered.set()
            return
        translated = outcome.failure if isinstance(outcome, Unusable) else outcome
        if isinstance(outcome, Unusable):
            moved = await anyio.to_thread.run_sync(
                lambda: self.quarantine.refuse(
                    path,
                    owner,
                    outcome.reason,
                    outcome.detail,
                    root=self.target.datasites_dir,
                )
            )
            if moved is None or self.quarantine.keep_originals:
                self.seen[path] = identity
            if outcome.failure is not None:
                # Counted as failed: an owner that restarts must not answer (and train) again.
                await anyio.to_thread.run_sync(self._remove_request, path)
        if isinstance(translated, Translated):
            task = self.state.answered(translated.task_id)
            self.answered += 1
            (log.info if translated.ok else log.warning)(
                "syft_flwr.reply",
                owner=owner,
                round=translated.round,
                request=request_hex,
                ok=translated.ok,
                detail=translated.detail or None,
                late=task is None,
            )
            if not isinstance(outcome, Unusable):
                await anyio.to_thread.run_sync(self._remove_pair, path)
            if owner in self.present:
                await anyio.to_thread.run_sync(self._beat, owner)

    def _remove_pair(self, response: Path) -> None:
        # The request first: an owner that restarts answers every request without a response.
        self._remove_request(response)
        self._unlink(response)

    def _remove_request(self, response: Path) -> None:
        self._unlink(response.with_suffix(".request"))

    def _unlink(self, path: Path) -> None:
        link = first_link_below(self.target.datasites_dir, path)
        if link is not None:
            log.warning("syft_flwr.cleanup_refused", path=printable(str(path)), why=f"{link} is a symlink")
            return
        _unlink(path)

    async def _retry_unsettled_forever(self) -> None:
        while True:
            if not self.unsettled:
                self._changed = anyio.Event()
                await self._changed.wait()
                continue
            due = min(since for _, since in self.unsettled.values()) + self.settle_seconds
            await anyio.sleep(max(0.0, due - time.monotonic()) + 0.01)
            await self.look_at(sorted(self.unsettled))

    # ---- safety net -------------------------------------------------------------------

    async def _rescan_forever(self) -> None:
        while True:
            await self.look_at(await anyio.to_thread.run_sync(self._scan))
            await anyio.sleep(self.rescan_interval_seconds)

    def _scan(self) -> list[Path]:
        found: list[Path] = []
        for owner in self.owners:
            schema = self.target.schema_path(owner)
            if os.path.lexists(schema):
                found.append(schema)
            try:
                entries = list(os.scandir(self.target.messages_dir(owner)))
            except OSError:
                continue
            found.extend(Path(e.path) for e in entries if e.name.endswith((".response", REFUSED_SUFFIX)))
        return found


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("syft_flwr.cleanup_failed", path=printable(str(path)), error=str(exc))


def _identity(path: Path) -> FileIdentity | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return FileIdentity(info.st_ino, info.st_size, info.st_mtime_ns)
