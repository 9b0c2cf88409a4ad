"""A syft-flwr ``.response`` becomes a typed result: the same ResultMessage a native file decodes to.

Runs in a worker thread. Every outcome is a value, never an exception:

- ``NotYet``: empty or cut-short JSON, which syft-rpc's two-step write
  (create, then fill) leaves for a moment; look again later.
- ``Translated``: a result (success or counted failure) for the round loop.
- ``Unusable``: the file is complete but cannot be used; the caller
  quarantines it, and ``failure`` (when the request is known) is counted
  too, so the round counts the owner as failed instead of waiting for its
  timeout.
- ``StopAcknowledged``: the owner's answer to the stop message.
- ``TornRequest``: the owner read our request half-downloaded.
"""

from __future__ import annotations

import base64
import binascii
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from fl_orchestrator.core.reasons import Reason, Rejection, printable
from fl_orchestrator.intake.safe_read import FileIdentity, read_below
from fl_orchestrator.protocols.syft_flwr.envelope import (
    EnvelopeError,
    decode_response,
    message_file_bound,
    node_id_of,
)
from fl_orchestrator.protocols.syft_flwr.flower_codec import (
    NUM_EXAMPLES_KEY,
    FlowerReply,
    ReplyError,
    content_format_hint,
    parse_reply,
)
from fl_orchestrator.protocols.syft_flwr.keys import (
    ENCRYPTION_HINT,
    PLAINTEXT_HINT,
    UNREADABLE_REQUEST_HINT,
    AggregatorKeys,
    SealError,
    looks_encrypted,
)
from fl_orchestrator.protocols.syft_flwr.layout import SyftFlwrLayout, resend_ids
from fl_orchestrator.wire.messages import Envelope, ModelSpec, ResultMessage

log = structlog.get_logger("fl_orchestrator.protocols.syft_flwr")

# What syft-event answers when it cannot load a request file: its handler never ran.
TORN_REQUEST_PREFIX = "Error loading request"
# Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION.
CLIENT_APP_RAISED = 2
_MAX_ERROR_CHARS = 1000


@dataclass(frozen=True)
class TaskInfo:
    """A request this daemon sent: enough to label the owner's answer."""

    owner: str
    round: int
    action: str
    deadline: float
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class SyftFlwrState:
    """What the publisher and the intake share (both in worker threads)."""

    spec: ModelSpec = field(default_factory=dict)
    pending: dict[str, TaskInfo] = field(default_factory=dict)
    stop_requests: dict[str, str] = field(default_factory=dict)  # task-style id -> owner
    # Request names of resends -> the task (or stop id) they stand for; and resends made.
    aliases: dict[str, str] = field(default_factory=dict)
    resends: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def task_for(self, request_hex: str) -> str:
        """The task (or stop id) a request name stands for."""
        with self.lock:
            return self.aliases.get(request_hex, request_hex)

    def register_resends(self, task_id: str) -> None:
        """Know the names a task may be resent under, so their answers find it (after a restart too)."""
        with self.lock:
            for alias in resend_ids(task_id):
                self.aliases[alias.hex] = task_id

    def add(self, task_id: str, info: TaskInfo) -> None:
        """Remember a request until it is answered."""
        with self.lock:
            self.pending[task_id] = info

    def answered(self, task_id: str) -> TaskInfo | None:
        """Forget an answered request; return what it was."""
        with self.lock:
            return self.pending.pop(task_id, None)

    def lookup(self, task_id: str) -> TaskInfo | None:
        """What a request was, if this daemon sent it."""
        with self.lock:
            return self.pending.get(task_id)


@dataclass(frozen=True)
class NotYet:
    """Maybe still being written."""

    detail: str


@dataclass(frozen=True)
class Translated:
    """A result for the round loop; ``known`` if it answers a request still pending."""

    task_id: str
    message: ResultMessage
    known: bool
    detail: str = ""

    @property
    def ok(self) -> bool:
        """The owner trained (or evaluated)."""
        return self.message.ok


@dataclass(frozen=True)
class Unusable:
    """Complete but unusable: quarantine it (and count the failure, if written)."""

    reason: Reason
    detail: str
    failure: Translated | None = None


@dataclass(frozen=True)
class TornRequest:
    """The owner read our request while it was still arriving (400 "Error loading request").

    Its ClientApp never ran, so sending the request again cannot make it train twice.
    """

    task_id: str
    stop: bool
    detail: str


@dataclass(frozen=True)
class StopAcknowledged:
    """The owner's answer to our stop message (status 200: it stopped)."""

    status_code: int = 200
    detail: str = ""


Outcome = NotYet | Translated | Unusable | StopAcknowledged | TornRequest


class ReplyTranslator:
    """Reads responses under the SyftBox root as results of job ``job``."""

    def __init__(
        self,
        layout: SyftFlwrLayout,
        job: str,
        state: SyftFlwrState,
        *,
        max_file_bytes: int,
        keys: AggregatorKeys | None = None,
    ) -> None:
        self.layout = layout
        self.job = job
        self.state = state
        self.max_file_bytes = max_file_bytes
        # Encrypted mode: replies are opened with the aggregator's keys (protocols/syft_flwr/keys.py).
        self.keys = keys
        self._plaintext_owners: set[str] = set()
        # Of the file the last translate read (per thread: several reads may run at once).
        self._last = threading.local()

    def reply_limit(self) -> int:
        """The largest response read: ``max_file_bytes``, or (0) what a reply to this model takes."""
        if self.max_file_bytes:
            return self.max_file_bytes
        sizes = [math.prod(shape) * dtype.itemsize for dtype, shape in self.state.spec.values()]
        return message_file_bound(sizes, encrypted=self.keys is not None)

    def translate(self, path: Path, owner: str, request_id_hex: str) -> tuple[Outcome, FileIdentity | None]:
        """Look at one response file, and say which file was read; never raises for its content."""
        self._last.identity = None
        try:
            outcome = self._translate(path, owner, request_id_hex)
        except Exception as exc:  # a bug here must cost one file, not the daemon
            log.exception("syft_flwr.internal_error", path=printable(str(path)), owner=owner)
            outcome = Unusable(Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {printable(str(exc), 500)}")
        identity: FileIdentity | None = self._last.identity
        return outcome, identity

    def _translate(self, path: Path, owner: str, request_id_hex: str) -> Outcome:
        try:
            data, self._last.identity = read_below(self.layout.datasites_dir, path, self.reply_limit())
        except Rejection as exc:
            if exc.reason == Reason.EMPTY_FILE:
                return NotYet(exc.detail)
            task_id = self.state.task_for(request_id_hex)
            task = self.state.lookup(task_id)
            if exc.reason == Reason.FILE_TOO_LARGE and task is not None and task.owner == owner:
                # The owner answered; waiting for its timeout would not change the answer.
                hint = f"{exc.detail} (a reply is about 4/3 of the model: raise limits.max_file_bytes)"
                return self._fail(owner, task_id, task, None, "ReplyTooLarge", hint, exc.reason)
            return Unusable(exc.reason, exc.detail)
        try:
            response = decode_response(data)
        except EnvelopeError as exc:
            if not exc.complete:
                return NotYet(exc.detail)
            return Unusable(Reason.MALFORMED, f"not a syft-rpc response: {exc.detail}")
        if response.id.hex != request_id_hex:
            return Unusable(
                Reason.REPLY_TO_MISMATCH, f"the file is named {request_id_hex} but answers {response.id.hex}"
            )
        task_id = self.state.task_for(request_id_hex)
        if response.sender != owner:
            return Unusable(
                Reason.BAD_FIELD, f"sender {printable(response.sender, 200)!r} writes in {owner}'s folder"
            )
        opened = self._open(owner, task_id, response.status_code, response.body)
        if not isinstance(opened, bytes | None):
            return opened
        body = opened
        torn = response.status_code == 400 and _text(body).startswith(TORN_REQUEST_PREFIX)
        if self.state.stop_requests.get(task_id) == owner:
            if torn:
                return TornRequest(task_id, True, _text(body))
            return StopAcknowledged(response.status_code, _text(body))
        task = self.state.lookup(task_id)
        if task is not None and task.owner != owner:
            return Unusable(
                Reason.NOT_SELECTED, f"answers a request sent to {task.owner}, from {owner}'s folder"
            )
        if torn and task is not None:
            return TornRequest(task_id, False, _text(body))
        if response.status_code != 200:
            detail = f"syft-rpc status {response.status_code}: {_text(body)}"
            return self._fail(owner, task_id, task, None, f"SyftRpcStatus{response.status_code}", detail)
        if not body:
            detail = "status 200 with no body"
            if self.keys is not None:
                detail = f"{detail} | {UNREADABLE_REQUEST_HINT}"
            return self._fail(owner, task_id, task, None, "EmptyReply", detail)
        try:
            reply = parse_reply(body)
        except ReplyError as exc:
            return self._fail(owner, task_id, task, None, "InvalidReply", str(exc))
        return self._from_reply(owner, task_id, task, reply)

    def _open(self, owner: str, task_id: str, status: int, body: bytes | None) -> bytes | Outcome | None:
        """The body as the owner wrote it before encryption; or the outcome if it cannot be had.

        A handler's answer (status 200) is the Flower message in base64; syft-event's own
        answers (a 400 or 419) are plain text.
        """
        if not body or not looks_encrypted(body):
            if body and status == 200 and self.keys is not None and owner not in self._plaintext_owners:
                self._plaintext_owners.add(owner)
                log.warning("syft_flwr.plaintext_reply", owner=owner, hint=PLAINTEXT_HINT)
            return body
        task = self.state.lookup(task_id)
        if self.keys is None:
            return self._fail(owner, task_id, task, None, "EncryptedReply", ENCRYPTION_HINT)
        try:
            text = self.keys.open(owner, body)
            return base64.b64decode(text, validate=True) if status == 200 else text.encode()
        except SealError as exc:
            return self._fail(owner, task_id, task, None, "Undecryptable", exc.detail, exc.reason)
        except binascii.Error as exc:
            detail = f"the decrypted reply is not base64: {exc}"
            return self._fail(owner, task_id, task, None, "Undecryptable", detail, Reason.UNDECRYPTABLE)

    def fail_task(self, owner: str, task_id: str, error_type: str, detail: str) -> Translated | None:
        """A counted failure for a request of ours that cannot be answered (None: not ours)."""
        task = self.state.lookup(task_id)
        if task is None or task.owner != owner:
            return None
        outcome = self._fail(owner, task_id, task, None, error_type, detail)
        if isinstance(outcome, Unusable):
            return outcome.failure
        return outcome if isinstance(outcome, Translated) else None

    def _from_reply(self, owner: str, task_id: str, task: TaskInfo | None, reply: FlowerReply) -> Outcome:
        if reply.src_node_id != node_id_of(owner):
            return Unusable(
                Reason.BAD_FIELD, f"src_node_id {reply.src_node_id} is not {owner}'s ({node_id_of(owner)})"
            )
        if not reply.ok:
            kind = (
                "ClientAppException"
                if reply.error_code == CLIENT_APP_RAISED
                else f"FlowerError{reply.error_code}"
            )
            detail = _first_lines(reply.error_reason)
            hint = content_format_hint(reply.error_reason)
            if hint:
                log.warning("syft_flwr.content_format_mismatch", owner=owner, hint=hint)
                detail = f"{detail} | {hint}"
            return self._fail(owner, task_id, task, reply, kind, detail)
        action = task.action if task is not None else reply.message_type
        if reply.message_type != action:
            detail = f"a {reply.message_type!r} reply to a {action!r} request"
            return self._fail(owner, task_id, task, reply, "InvalidReply", detail)
        if reply.dropped_metrics:
            log.warning(
                "syft_flwr.metrics_dropped",
                owner=owner,
                metrics=list(reply.dropped_metrics),
                why="only finite scalar metrics are kept",
            )
        metrics = dict(reply.metrics)
        count = metrics.pop(NUM_EXAMPLES_KEY, None)
        if not isinstance(count, int) or count < 0:
            detail = f"metrics[{NUM_EXAMPLES_KEY!r}] must be an int >= 0, got {count!r}"
            return self._fail(owner, task_id, task, reply, "InvalidReply", detail)
        arrays: dict[str, np.ndarray] = {}
        if action == "train":
            mapped = _map_arrays(reply.arrays, self.state.spec)
            if isinstance(mapped, str):
                return self._fail(owner, task_id, task, reply, "InvalidReply", mapped)
            arrays = mapped  # checked against the model by the shared validator, as every result is
        rnd = self._round_of(task, reply)
        if rnd is None:
            return Unusable(Reason.UNKNOWN_ROUND, f"group_id {reply.group_id!r} names no round")
        result = ResultMessage(
            Envelope(self.job, rnd, secrets.token_hex(16), task_id, time.time(), None),
            True,
            count,
            metrics,
            arrays=arrays,
            action=action,
        )
        return Translated(task_id, result, task is not None)

    def _fail(
        self,
        owner: str,
        task_id: str,
        task: TaskInfo | None,
        reply: FlowerReply | None,
        error_type: str,
        detail: str,
        reason: Reason = Reason.MALFORMED,
    ) -> Outcome:
        """A counted failure when the request is known; otherwise only a refusal."""
        rnd = self._round_of(task, reply)
        if rnd is None:
            return Unusable(
                Reason.NOT_SELECTED, f"{error_type}: {detail} (and it answers no request of this run)"
            )
        action = task.action if task is not None else (reply.message_type if reply else "train")
        result = ResultMessage(
            Envelope(self.job, rnd, secrets.token_hex(16), task_id, time.time(), None),
            False,
            0,
            {},
            error_type=error_type,
            error_message=printable(detail, _MAX_ERROR_CHARS),
            action=action if action in ("train", "evaluate") else "train",
        )
        failure = Translated(task_id, result, task is not None, f"{error_type}: {detail}")
        if error_type in ("InvalidReply", "EmptyReply", "ReplyTooLarge", "Undecryptable"):
            return Unusable(reason, f"{error_type}: {detail}", failure)
        return failure

    @staticmethod
    def _round_of(task: TaskInfo | None, reply: FlowerReply | None) -> int | None:
        if task is not None:
            return task.round
        if reply is not None and reply.group_id.isdigit():
            return int(reply.group_id)
        return None


def _map_arrays(arrays: list[tuple[str, np.ndarray]], spec: ModelSpec) -> dict[str, np.ndarray] | str:
    """The reply's arrays under the model's names: by name, or by position as Flower lists send them."""
    names = list(spec)
    if len(arrays) != len(names):
        return f"{len(arrays)} arrays in the reply; the model has {len(names)}"
    by_name = dict(arrays)
    if set(by_name) == set(names):
        return {name: by_name[name] for name in names}
    return {name: array for name, (_, array) in zip(names, arrays, strict=True)}


def _text(body: bytes | None) -> str:
    if not body:
        return "(no body)"
    return printable(body[:_MAX_ERROR_CHARS].decode("utf-8", "replace"), _MAX_ERROR_CHARS)


def _first_lines(reason: str) -> str:
    # syft-flwr puts the owner's whole traceback in the reason: keep its head only.
    return printable(" | ".join(reason.strip().splitlines()[:3]), _MAX_ERROR_CHARS)
