"""syft-flwr as the one intake reads it: owners' responses, their presence, the stop message.

The adapter of intake/adapter.py for ``job.protocol = "syft-flwr"``. The
shared watcher follows the folders on the way to each owner's
``rpc/messages/<aggregator>/``; the shared intake loop calls ``read`` in a
worker thread. A response becomes the same typed result a native file
decodes to, its arrays pass the same validator, and it is counted or
refused by the round loop like any other. Nothing is written anywhere
before that.

- **Presence** is the owner's ``rpc.schema.json`` (written when its
  main.py starts): present from then until it misses a deadline (the
  machine's ``timeout_means_gone``), and again from any answer to a request
  of ours.
- **After the decision** (``decided``) the request and its response are
  removed, so an owner that restarts does not answer (and train) again. A
  counted result is first kept as a native file under the state folder
  (``keep``): a restart and the whole-set strategies read it there.
- Answers to the stop message, requests read half-downloaded (sent again
  under a new name) and uploads the sync refused are dealt with here and
  never reach the round loop as results.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import structlog

from fl_orchestrator.core.reasons import Reason, Rejection, printable
from fl_orchestrator.intake.adapter import Outcome, Settled
from fl_orchestrator.intake.reader import Inbound, InboundReader, Refused, ResultHandle
from fl_orchestrator.intake.safe_read import FileIdentity
from fl_orchestrator.protocols.syft_flwr.layout import (
    SCHEMA_FILE,
    SyftFlwrKind,
    SyftFlwrLayout,
    SyftFlwrTree,
    first_link_below,
)
from fl_orchestrator.protocols.syft_flwr.publisher import SyftFlwrPublisher
from fl_orchestrator.protocols.syft_flwr.replies import (
    NotYet,
    ReplyTranslator,
    StopAcknowledged,
    SyftFlwrState,
    TornRequest,
    Translated,
    Unusable,
)
from fl_orchestrator.storage.kept import KeptResults
from fl_orchestrator.wire.layout import Classified, FileKind
from fl_orchestrator.wire.messages import Envelope, HeartbeatMessage, encode_result_frames, sha256_of_frames

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


class SyftFlwrWire:
    """The syft-flwr adapter: classify, read, keep and clean up; send the stop at the end."""

    def __init__(
        self,
        target: SyftFlwrLayout,
        owners: tuple[str, ...],
        state: SyftFlwrState,
        publisher: SyftFlwrPublisher,
        translator: ReplyTranslator,
    ) -> None:
        self.target = target
        self.tree = SyftFlwrTree(target)
        self.owners = frozenset(owners)
        self.state = state
        self.publisher = publisher
        self.translator = translator
        self.present: set[str] = set()
        self.keyless: set[str] = set()  # encrypted mode: owners seen without published keys
        # The native encoding of each validated result until it is kept or refused.
        self._unkept: dict[Path, list[Any]] = {}
        self._lock = threading.Lock()
        self.stop_reason = "job complete"
        self.stop_pending: set[str] = set()
        self.stops_answered = anyio.Event()

    # ---- where the files are (the shared watcher) -------------------------------------

    @property
    def datasites_dir(self) -> Path:
        """The folder that holds every datasite."""
        return self.tree.datasites_dir

    @property
    def aggregator(self) -> str:
        """The aggregator's email."""
        return self.tree.aggregator

    @property
    def marker(self) -> str:
        """Every file of this app lies below its rpc folder."""
        return self.tree.marker

    def folders_on_the_way(self, datasite: str) -> list[Path]:
        """datasites/<owner> down to rpc/messages/<aggregator>/, where the responses land."""
        return self.tree.folders_on_the_way(datasite)

    def scan(self, datasites: tuple[str, ...]) -> Iterator[Path]:
        """Every owner's rpc.schema.json, responses and refused uploads present now."""
        return self.tree.scan(datasites)

    def classify(self, path: Path) -> Classified | None:
        """Presence is a heartbeat, a response or refused upload a result; the rest is ignored."""
        found = self.target.classify(path)
        if found is None:
            return None
        if found.kind == SyftFlwrKind.PRESENCE and path.name == SCHEMA_FILE:
            return Classified(found.owner, FileKind.HEARTBEAT)
        if found.kind in (SyftFlwrKind.RESPONSE, SyftFlwrKind.REFUSED_UPLOAD):
            return Classified(found.owner, FileKind.RESULT)
        return Classified(found.owner, FileKind.IGNORED)

    def look_at(self, path: Path) -> Path:
        """Responses are whole files."""
        return path

    def parts_signature(self, path: Path) -> tuple[tuple[str, int, int], ...]:
        """Responses have no parts."""
        return ()

    # ---- reading (worker thread) ------------------------------------------------------

    def read(self, path: Path, classified: Classified, reader: InboundReader) -> Outcome:
        """One presence, response or refused upload, as an outcome for the intake loop."""
        owner = classified.datasite
        if owner not in self.owners:
            return Refused(path, owner, Reason.UNKNOWN_DATASITE, f"{owner!r} is not in this job", None)
        found = self.target.classify(path)
        assert found is not None
        if classified.kind == FileKind.HEARTBEAT:
            return self._presence(path, owner)
        assert found.request_id is not None
        if found.kind == SyftFlwrKind.REFUSED_UPLOAD:
            return self._refused_upload(path, owner, found.request_id.hex)
        outcome, identity = self.translator.translate(path, owner, found.request_id.hex)
        if isinstance(outcome, NotYet):
            # The intake loop reads it again on its next event, and refuses it once it settles.
            return Refused(path, owner, Reason.TRUNCATED, outcome.detail, identity)
        if isinstance(outcome, TornRequest):
            return self._torn(path, owner, found.request_id.hex, outcome, identity)
        if isinstance(outcome, StopAcknowledged):
            return self._stopped(path, owner, outcome, identity)
        if identity is None:
            identity = _identity(path)
        if isinstance(outcome, Unusable):
            if outcome.failure is None or identity is None:
                return Refused(path, owner, outcome.reason, outcome.detail, identity)
            return self._inbound(path, owner, identity, outcome.failure, (outcome.reason, outcome.detail))
        assert identity is not None  # a translated response was read
        if outcome.ok and outcome.message.action == "train":
            return self._checked(path, owner, identity, outcome, reader)
        return self._inbound(path, owner, identity, outcome)

    def _checked(
        self, path: Path, owner: str, identity: FileIdentity, translated: Translated, reader: InboundReader
    ) -> Outcome:
        """Arrays through the shared validator; the native encoding hashed for the kept copy."""
        try:
            message, norm, clipped = reader.check_arrays(translated.message)
        except Rejection as exc:
            if not translated.known:
                return Refused(path, owner, exc.reason, exc.detail, identity)
            # Answered is answered: the owner will not send another, so count its failure now.
            detail = f"{exc.reason.value}: {exc.detail}"
            failure = self.translator.fail_task(owner, translated.task_id, "InvalidReply", detail)
            if failure is None:
                return Refused(path, owner, exc.reason, exc.detail, identity)
            return self._inbound(path, owner, identity, failure, (exc.reason, exc.detail))
        # The unclipped result is kept (as a native file's bytes are): a restart clips it again.
        frames = encode_result_frames(translated.message)
        with self._lock:
            self._unkept[path] = frames
        _log_reply(owner, path, translated)
        return Inbound(
            path,
            owner,
            identity,
            message,
            norm,
            clipped,
            sha256_of_frames(frames),
            alive=translated.known,
        )

    def _inbound(
        self,
        path: Path,
        owner: str,
        identity: FileIdentity,
        translated: Translated,
        refusal: tuple[Reason, str] | None = None,
    ) -> Inbound:
        _log_reply(owner, path, translated)
        return Inbound(path, owner, identity, translated.message, refusal=refusal, alive=translated.known)

    def _presence(self, path: Path, owner: str) -> Outcome:
        identity = _identity(path)
        if identity is None:
            return Refused(path, owner, Reason.VANISHED, "the file vanished before it was read", None)
        keys = self.translator.keys
        if keys is not None and not keys.has_public_key(owner):
            # Not present: nothing can be sent to it. Said at once, not as a timeout; no identity
            # is kept, so its schema is looked at again (next event or rescan) until its keys appear.
            with self._lock:
                first = owner not in self.keyless
                self.keyless.add(owner)
            if first:
                hint = keys.no_key_hint(owner)
                log.warning("syft_flwr.owner_without_keys", owner=owner, reason="no_public_key", hint=hint)
            return Settled(path, None, "no published keys")
        with self._lock:
            self.keyless.discard(owner)
            first = owner not in self.present
            self.present.add(owner)
        if first:
            log.info("syft_flwr.owner_present", owner=owner, schema=str(path))
        seen_at = identity.mtime_ns / 1e9
        beat = HeartbeatMessage(Envelope(self.translator.job, 0, "", None, seen_at, None), "idle")
        return Inbound(path, owner, identity, beat)

    def _refused_upload(self, path: Path, owner: str, request_hex: str) -> Outcome:
        """The aggregator's SyftBox client could not upload a request: fail the owner now."""
        identity = _identity(path)
        task_id = self.state.task_for(request_hex)
        hint = REFUSED_UPLOAD_HINT.format(owner=owner)
        failure = self.translator.fail_task(owner, task_id, "SyncRefused", hint)
        log.error(
            "syft_flwr.upload_refused",
            owner=owner,
            request=request_hex,
            counted_as_failure=failure is not None,
            hint=hint,
        )
        if failure is None or identity is None:
            return Settled(path, identity, "a refused upload of no pending request")
        return Inbound(path, owner, identity, failure.message)

    def _torn(
        self, path: Path, owner: str, request_hex: str, torn: TornRequest, identity: FileIdentity | None
    ) -> Outcome:
        # Remove both first: the owner ignores a request that already has a response.
        self._remove_pair(path)
        if torn.stop:
            resent = self.publisher.resend_stop(torn.task_id, self.stop_reason)
        else:
            resent = self.publisher.resend(torn.task_id) is not None
        log.warning(
            "syft_flwr.request_resent" if resent else "syft_flwr.request_lost",
            owner=owner,
            request=request_hex,
            stop=torn.stop,
            why="the owner read it while it was still arriving: " + torn.detail[:200],
        )
        if resent or torn.stop or identity is None:
            return Settled(path, identity, "sent again")
        failure = self.translator.fail_task(owner, torn.task_id, "SyftRpcStatus400", torn.detail)
        if failure is None:
            return Settled(path, identity, "not a pending request")
        return self._inbound(path, owner, identity, failure)

    def _stopped(
        self, path: Path, owner: str, answer: StopAcknowledged, identity: FileIdentity | None
    ) -> Outcome:
        self._remove_pair(path)
        if answer.status_code == 200:
            log.info("syft_flwr.stopped", owner=owner)
        else:
            log.warning(
                "syft_flwr.stop_refused", owner=owner, status=answer.status_code, detail=answer.detail
            )
        with self._lock:
            self.stop_pending.discard(owner)
            done = not self.stop_pending
        if done:
            _set_from_any_thread(self.stops_answered)
        return Settled(path, identity, "the owner answered the stop message")

    # ---- after the round loop decided -------------------------------------------------

    def keep(self, kept: KeptResults, rnd: int, handle: ResultHandle) -> bool:
        """Keep the validated result as a native file; a replay finds the copy already there."""
        with self._lock:
            frames = self._unkept.pop(handle.path, None)
        if frames is None:
            return os.path.lexists(kept.path_for(rnd, handle.path))
        return kept.write(rnd, handle.path, frames)

    def decided(self, handle: ResultHandle) -> None:
        """Counted (and kept) or refused: forget the request, and remove it and its response."""
        with self._lock:
            self._unkept.pop(handle.path, None)
        found = self.target.classify(handle.path)
        if found is None or found.kind != SyftFlwrKind.RESPONSE or found.request_id is None:
            return
        self.state.answered(self.state.task_for(found.request_id.hex))
        self._remove_pair(handle.path)

    # ---- the end of the job -----------------------------------------------------------

    async def finish(self, reason: str, *, wait_seconds: float) -> None:
        """Send the stop message to every owner, then wait (bounded) for their answers."""
        self.stop_reason = reason
        never_seen = sorted(self.owners - self.present)
        if never_seen:
            log.warning("syft_flwr.owners_never_seen", owners=never_seen, hint=NEVER_SEEN_HINT)
        owners = tuple(sorted(self.owners))
        # Pending before the first request exists: its answer may come while others are written.
        with self._lock:
            self.stop_pending = set(self.publisher.stop_targets(owners))
        self.stops_answered = anyio.Event()
        sent = await anyio.to_thread.run_sync(self.publisher.send_stop, owners, reason)
        log.info("syft_flwr.stop_sent", owners=sorted(sent), reason=reason)
        with self._lock:
            if not self.stop_pending:
                return
        with anyio.move_on_after(wait_seconds):
            await self.stops_answered.wait()
        if self.stop_pending:
            log.warning(
                "syft_flwr.stop_unanswered", owners=sorted(self.stop_pending), waited_seconds=wait_seconds
            )

    # ---- clean-up ---------------------------------------------------------------------

    def _remove_pair(self, response: Path) -> None:
        # The request first: an owner that restarts answers every request without a response.
        self._unlink(response.with_suffix(".request"))
        self._unlink(response)

    def _unlink(self, path: Path) -> None:
        link = first_link_below(self.target.datasites_dir, path)
        if link is not None:
            log.warning("syft_flwr.cleanup_refused", path=printable(str(path)), why=f"{link} is a symlink")
            return
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("syft_flwr.cleanup_failed", path=printable(str(path)), error=str(exc))


def _log_reply(owner: str, path: Path, translated: Translated) -> None:
    (log.info if translated.ok else log.warning)(
        "syft_flwr.reply",
        owner=owner,
        round=translated.message.envelope.round,
        request=path.stem,
        ok=translated.ok,
        detail=translated.detail or None,
        late=not translated.known,
    )


def _set_from_any_thread(event: anyio.Event) -> None:
    """Set an anyio event from a worker thread of the loop (or from the loop itself)."""
    try:
        anyio.from_thread.run_sync(event.set)
    except RuntimeError:
        event.set()  # not in a worker thread: already in the loop's own thread


def _identity(path: Path) -> FileIdentity | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return FileIdentity(info.st_ino, info.st_size, info.st_mtime_ns)
