"""A Flower ``Grid`` over the daemon's syft-flwr transport, for ServerApps that run their own loop.

An unchanged ``main(grid, context)`` ServerApp (federated analytics sending
``query`` messages, retrieval, any loop of its own) gets this grid. Its user
code runs in a worker thread and blocks in ``send_and_receive``; the
daemon's event loop watches the owners' folders and hands each reply to the
waiting thread the moment its file lands (``ReplyBox``): no polling.

- ``get_node_ids``: the owners present (their ``rpc.schema.json``, and in
  encrypted mode their published keys), as syft-flwr numbers them.
- ``push_messages``: each message becomes one syft-rpc request, sealed for
  its owner in encrypted mode, written atomically.
- ``pull_messages`` / ``send_and_receive``: the replies that have arrived,
  opened and decoded. A request the owner read half-downloaded is sent again
  under a new name; a reply that cannot be used comes back as a Flower error
  reply, so the user's loop sees every message answered or timed out.
"""

from __future__ import annotations

import base64
import binascii
import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.common.message import Error
from flwr.common.serde import message_from_proto
from flwr.common.typing import Run
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid

from fl_orchestrator.core.reasons import Reason, Rejection, printable
from fl_orchestrator.intake.safe_read import read_below
from fl_orchestrator.protocols.syft_flwr import flower_codec
from fl_orchestrator.protocols.syft_flwr.envelope import (
    EnvelopeError,
    decode_response,
    encode_request,
    node_id_of,
)
from fl_orchestrator.protocols.syft_flwr.keys import AggregatorKeys, SealError, looks_encrypted
from fl_orchestrator.protocols.syft_flwr.layout import MAX_RESENDS, SyftFlwrLayout, first_link_below
from fl_orchestrator.protocols.syft_flwr.replies import TORN_REQUEST_PREFIX
from fl_orchestrator.storage.atomic import atomic_write

log = structlog.get_logger("fl_orchestrator.server_app")

DEFAULT_TTL_SECONDS = 3600.0


class _StillArriving(Exception):
    """A response file that exists but is still empty: read it again on its next event."""


class GridClosed(Exception):
    """The daemon is stopping: no more messages go out or come in."""


class ReplyBox:
    """Presence and arrived responses, filled by the event loop, waited on by the ServerApp's thread."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._present: set[str] = set()
        self._arrived: dict[uuid.UUID, Path] = {}
        self.closed = False

    def present(self, owner: str) -> None:
        """The owner's handler is up."""
        with self._changed:
            self._present.add(owner)
            self._changed.notify_all()

    def arrived(self, request_id: uuid.UUID, path: Path) -> None:
        """A response file landed."""
        with self._changed:
            self._arrived[request_id] = path
            self._changed.notify_all()

    def close(self) -> None:
        """Wake every waiting thread: the daemon is stopping."""
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def owners(self) -> set[str]:
        """The owners present now."""
        with self._changed:
            return set(self._present)

    def has(self, request_id: uuid.UUID) -> bool:
        """True if the response to this request has landed and not been taken."""
        with self._changed:
            return request_id in self._arrived

    def take(self, request_id: uuid.UUID) -> Path | None:
        """The response to this request, if it has landed (forgotten once taken)."""
        with self._changed:
            return self._arrived.pop(request_id, None)

    def wait(self, ready: Callable[[], bool], deadline: float) -> None:
        """Until ready() holds, the monotonic deadline passes, or the box closes."""
        with self._changed:
            while not ready() and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._changed.wait(left)


@dataclass
class _Sent:
    owner: str
    message: Message
    body: bytes
    request_id: uuid.UUID
    resends: int = 0
    expires: float = 0.0
    names: list[uuid.UUID] = field(default_factory=list)


class SyftFlwrGrid(Grid):  # type: ignore[misc]
    """Flower's Grid, served by the daemon's transport (see the module docstring)."""

    def __init__(
        self,
        target: SyftFlwrLayout,
        owners: Iterable[str],
        box: ReplyBox,
        *,
        keys: AggregatorKeys | None,
        run_id: int,
        reply_limit: int,
        counts: dict[str, dict[str, int]],
    ) -> None:
        self.target = target
        self.owner_of = {node_id_of(owner): owner for owner in owners}
        self.box = box
        self.keys = keys
        self.reply_limit = reply_limit
        self.counts = counts  # per owner: sent, answered, failed (the daemon logs them)
        self._run = Run.create_empty(run_id)
        self._sent: dict[str, _Sent] = {}
        self._lock = threading.Lock()

    # ---- Flower's Grid ------------------------------------------------------------------

    def set_run(self, run_id: int) -> None:
        """Name the run: its id goes into every message's metadata."""
        self._run = Run.create_empty(run_id)

    @property
    def run(self) -> Run:
        """The current run."""
        return Run(**vars(self._run))

    def create_message(
        self, content: Any, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """A message to one owner, as Flower's grids make it."""
        return Message(
            content=content,
            dst_node_id=dst_node_id,
            message_type=message_type,
            ttl=ttl or DEFAULT_TTL_SECONDS,
            group_id=group_id,
        )

    def get_node_ids(self) -> list[int]:
        """The owners present now, by syft-flwr's node ids."""
        self._open_or_raise()
        present = self.box.owners()
        return [node for node, owner in self.owner_of.items() if owner in present]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Write one request per message; return their ids (ValueError for an unknown node)."""
        ids = []
        for message in messages:
            self._open_or_raise()
            owner = self.owner_of.get(message.metadata.dst_node_id)
            if owner is None:
                raise ValueError(
                    f"unknown destination node {message.metadata.dst_node_id}; known: {sorted(self.owner_of)}"
                )
            body = flower_codec.serialize(message, self._run.run_id)
            request_id = uuid.uuid4()
            sent = _Sent(owner, message, body, request_id, expires=time.time() + message.metadata.ttl)
            sent.names.append(request_id)
            if self._write(sent, request_id):
                with self._lock:
                    self._sent[str(request_id)] = sent
                    # The stop message is no request of the ServerApp's: counted apart.
                    kind = "stop_sent" if message.metadata.group_id == flower_codec.STOP_GROUP_ID else "sent"
                    numbers = self.counts.setdefault(owner, {"sent": 0, "answered": 0, "failed": 0})
                    numbers[kind] = numbers.get(kind, 0) + 1
                ids.append(str(request_id))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies that have arrived for these ids (each returned once)."""
        return [reply for _, reply in self._pull(message_ids)]

    def _pull(self, message_ids: Iterable[str]) -> list[tuple[str, Message]]:
        replies = []
        for message_id in message_ids:
            with self._lock:
                sent = self._sent.get(message_id)
            if sent is None:
                continue
            path = self.box.take(sent.names[-1])
            if path is None:
                continue
            try:
                reply = self._read(sent, path)
            except _StillArriving:
                continue
            if reply is None:
                continue  # sent again under a new name
            with self._lock:
                self._sent.pop(message_id, None)
                counts = self.counts[sent.owner]
                counts["failed" if reply.has_error() else "answered"] += 1
            replies.append((message_id, reply))
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push, then wait (by file events) until every reply is in or ``timeout`` passes."""
        ids = self.push_messages(messages)
        deadline = time.monotonic() + (DEFAULT_TTL_SECONDS if timeout is None else timeout)
        replies: list[Message] = []
        waiting = set(ids)
        while waiting:
            self.box.wait(functools.partial(self._any_arrived, set(waiting)), deadline)
            self._open_or_raise()
            got = self._pull(list(waiting))
            replies += [reply for _, reply in got]
            waiting -= {message_id for message_id, _ in got}
            if time.monotonic() >= deadline:
                break
        if waiting:
            log.warning("server_app.timed_out", waiting=len(waiting), owners=sorted(self._owners(waiting)))
        return replies

    def send_stop(self, reason: str) -> None:
        """syft-flwr's stop message to every owner present: their main.py exits."""
        from flwr.app import ConfigRecord, RecordDict
        from flwr.common.constant import MessageType

        stop = RecordDict({flower_codec.CONFIG_KEY: ConfigRecord({"action": "stop", "reason": reason})})
        nodes = self.get_node_ids()
        self.push_messages(
            self.create_message(stop, MessageType.SYSTEM, node, flower_codec.STOP_GROUP_ID, ttl=60.0)
            for node in nodes
        )

    # ---- the files ----------------------------------------------------------------------

    def _write(self, sent: _Sent, request_id: uuid.UUID) -> bool:
        body = sent.body
        if self.keys is not None:
            try:
                body = self.keys.seal(sent.owner, body)
            except SealError as exc:
                why = exc.detail
                log.error("server_app.request_not_written", owner=sent.owner, reason=str(exc.reason), why=why)
                return False
        path = self.target.request_path(sent.owner, request_id)
        link = first_link_below(self.target.datasites_dir, path)
        if link is not None:
            log.error("server_app.request_not_written", owner=sent.owner, why=f"{link} is a symlink")
            return False
        chunks = encode_request(
            request_id=request_id,
            sender=self.target.aggregator,
            url=self.target.url(sent.owner),
            body=body,
            created=time.time(),
            expires=sent.expires,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, chunks, durable=False)
        log.info(
            "server_app.pushed",
            owner=sent.owner,
            message_type=sent.message.metadata.message_type,
            group_id=sent.message.metadata.group_id,
            request=str(request_id),
        )
        return True

    def _read(self, sent: _Sent, path: Path) -> Message | None:
        """The reply in a response file, or a Flower error reply; None when it was sent again."""
        try:
            data, _ = read_below(self.target.datasites_dir, path, self.reply_limit)
        except Rejection as exc:
            if exc.reason == Reason.EMPTY_FILE:
                # Created, not yet written (an owner's plain write): its next event brings it again.
                raise _StillArriving() from None
            self._remove(sent.owner, sent.names[-1])
            return self._failed(sent, f"unusable response: {exc}")
        try:
            response = decode_response(data)
        except (Rejection, EnvelopeError) as exc:
            return self._failed(sent, f"unusable response: {exc}")
        finally:
            self._remove(sent.owner, sent.names[-1])
        if response.sender != sent.owner:
            return self._failed(sent, f"answered by {printable(response.sender, 200)!r}")
        body = response.body or b""
        if looks_encrypted(body):
            if self.keys is None:
                return self._failed(sent, "an encrypted reply, and this run does not encrypt")
            try:
                text = self.keys.open(sent.owner, body)
                body = base64.b64decode(text, validate=True) if response.status_code == 200 else text.encode()
            except (SealError, binascii.Error) as exc:
                return self._failed(sent, f"undecryptable: {exc}")
        torn = response.status_code == 400 and body.decode("utf-8", "replace").startswith(TORN_REQUEST_PREFIX)
        if torn and sent.resends < MAX_RESENDS:
            # The owner read our request half-downloaded and never ran its handler: send it again.
            sent.resends += 1
            request_id = uuid.uuid4()
            sent.names.append(request_id)
            log.info("server_app.resent", owner=sent.owner, request=str(request_id), why="read torn")
            if self._write(sent, request_id):
                return None
        if response.status_code != 200:
            text = printable(body.decode("utf-8", "replace"), 300)
            return self._failed(sent, f"syft-rpc status {response.status_code}: {text}")
        proto = ProtoMessage()
        try:
            proto.ParseFromString(body)
            reply: Message = message_from_proto(proto)
        except Exception as exc:
            return self._failed(sent, f"not a Flower message: {type(exc).__name__}")
        log.info("server_app.reply", owner=sent.owner, error=reply.has_error())
        return reply

    def _failed(self, sent: _Sent, reason: str) -> Message:
        log.warning("server_app.reply_failed", owner=sent.owner, reason=reason)
        return Message(Error(code=ErrorCode.UNKNOWN, reason=reason), reply_to=sent.message)

    def _remove(self, owner: str, request_id: uuid.UUID) -> None:
        for path in (
            self.target.request_path(owner, request_id),
            self.target.response_path(owner, request_id),
        ):
            if first_link_below(self.target.datasites_dir, path) is None:
                path.unlink(missing_ok=True)

    # ---- bookkeeping --------------------------------------------------------------------

    def _open_or_raise(self) -> None:
        if self.box.closed:
            raise GridClosed("fl-orchestratord is stopping")

    def _any_arrived(self, ids: set[str]) -> bool:
        with self._lock:
            names = [self._sent[i].names[-1] for i in ids if i in self._sent]
        return any(self.box.has(name) for name in names)

    def _owners(self, ids: set[str]) -> set[str]:
        with self._lock:
            return {self._sent[i].owner for i in ids if i in self._sent}
