"""Tasks become syft-rpc requests in each data owner's app folder.

For every task, a ``<uuid>.request`` holding a Flower message with the
round's model. The uuid is the task id, so a request rewritten after a
restart has the same name and is not written twice. Requests are written
under a temp name and renamed: syft-flwr's owners react to the rename, never
to a half-written file. Nothing else is written: the model travels inside
each request.
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from fl_orchestrator.protocols.contract import Broadcast
from fl_orchestrator.protocols.syft_flwr import flower_codec
from fl_orchestrator.protocols.syft_flwr.envelope import encode_request, node_id_of
from fl_orchestrator.protocols.syft_flwr.keys import AggregatorKeys, KeysError, SealError
from fl_orchestrator.protocols.syft_flwr.layout import (
    SyftFlwrLayout,
    first_link_below,
    request_id_for_task,
    resend_ids,
    task_id_for_request,
)
from fl_orchestrator.protocols.syft_flwr.replies import SyftFlwrState, TaskInfo
from fl_orchestrator.storage.atomic import atomic_write
from fl_orchestrator.storage.job_state import StartRefused
from fl_orchestrator.storage.models import SavedModel
from fl_orchestrator.wire.messages import ModelRef, model_spec

log = structlog.get_logger("fl_orchestrator.protocols.syft_flwr")

STOP_EXPIRY_SECONDS = 300.0
_STOP_NAMESPACE = uuid.UUID("6f1c1a52-64a4-4d3e-9a53-0a4be6f0c7d1")


class SyftFlwrPublisher:
    """The publisher (protocols/contract.py) of syft-flwr: one syft-rpc request per task."""

    def __init__(
        self,
        datasites: tuple[str, ...],
        *,
        target: SyftFlwrLayout,
        state: SyftFlwrState,
        run_id: str,
        expiry_margin_seconds: float,
        keys: AggregatorKeys | None = None,
        content_format: str = "message",
    ) -> None:
        self.datasites = datasites
        # What the owners' ClientApp reads (flower_codec.CONTENT_FORMATS).
        self.content_format = content_format
        # Encrypted mode: every request is sealed for its owner (protocols/syft_flwr/keys.py).
        self.keys = keys
        self.target = target
        self.state = state
        self.run_id = run_id
        self.flower_run_id = zlib.crc32(run_id.encode())
        self.expiry_margin_seconds = expiry_margin_seconds
        self.bytes_written = 0
        self._model: tuple[int, Mapping[str, np.ndarray]] | None = None

    @property
    def models_dir(self) -> Path:
        """The model travels in each request: where the requests go."""
        return self.target.datasites_dir

    @property
    def tasks_dir(self) -> Path:
        """Requests go into each owner's rpc/messages/<aggregator>/."""
        return self.target.datasites_dir

    def prepare(self) -> list[Path]:
        """In encrypted mode, the aggregator's keys and its published DID; nothing else to prepare.

        Each owner's folders are its own (syft-event writes them). Raises StartRefused
        when the keys and the published DID disagree: the message says what to do.
        """
        if self.keys is not None:
            try:
                done = self.keys.ensure()
            except KeysError as exc:
                raise StartRefused(f"syft_flwr.encryption: {exc}") from None
            log.info("syft_flwr.keys", done=done, did=str(self.keys.did_file), keys=str(self.keys.keys_dir))
        return []

    def set_run(self, run_id: str) -> None:
        """Name the run (known once the state is opened): it seeds the Flower run id and stop ids."""
        self.run_id = run_id
        self.flower_run_id = zlib.crc32(run_id.encode())

    def write_model(
        self, rnd: int, model: Mapping[str, np.ndarray], saved: SavedModel | None = None
    ) -> Broadcast:
        """Keep the arrays for this round's requests (the model travels inside each one)."""
        self._model = (rnd, model)
        self.state.spec = model_spec(model)
        nbytes = sum(int(array.nbytes) for array in model.values())
        return Broadcast(rnd, ModelRef(f"(in each request) round {rnd}", "", nbytes), nbytes)

    def write_tasks(
        self,
        broadcast: Broadcast,
        tasks: Mapping[str, str],
        *,
        attempt: int,
        deadline: float,
        config: Mapping[str, Any],
        action: str = "train",
        rnd: int | None = None,
    ) -> int:
        """Write one request per owner; return the bytes written."""
        total = 0
        assert self._model is not None and self._model[0] == broadcast.round, "write_model comes first"
        task_round = broadcast.round if rnd is None else rnd
        now = time.time()
        expires = max(deadline, now) + self.expiry_margin_seconds
        content = None
        for owner, task_id in tasks.items():
            self.state.add(task_id, TaskInfo(owner, task_round, action, deadline, dict(config)))
            self.state.register_resends(task_id)
            names = [request_id_for_task(task_id), *resend_ids(task_id)]
            if any(self._sent(owner, name) for name in names):
                continue  # written before a restart (same names): the owner may be answering it
            if content is None:
                content = flower_codec.round_content(
                    self._model[1], config, purpose=action, content_format=self.content_format
                )
            body = self._task_body(content, owner, action, task_round, expires - now)
            total += self._write_request(owner, names[0], body, now, expires)
        self.bytes_written += total
        return total

    def resend(self, task_id: str) -> uuid.UUID | None:
        """Send a task again under its next name; None if it is not pending or out of resends."""
        task = self.state.lookup(task_id)
        count = self.state.resends.get(task_id, 0)
        if task is None or count >= len(resend_ids(task_id)) or self._model is None:
            return None
        model_round = task.round + 1 if task.action == "evaluate" else task.round
        if self._model[0] != model_round:
            return None  # the job has moved on to another model
        self.state.resends[task_id] = count + 1
        name = resend_ids(task_id)[count]
        now = time.time()
        expires = max(task.deadline, now) + self.expiry_margin_seconds
        content = flower_codec.round_content(
            self._model[1], task.config, purpose=task.action, content_format=self.content_format
        )
        body = self._task_body(content, task.owner, task.action, task.round, expires - now)
        self._write_request(task.owner, name, body, now, expires)
        return name

    def _task_body(self, content: Any, owner: str, action: str, task_round: int, ttl_seconds: float) -> bytes:
        return flower_codec.request_body(
            content,
            purpose=action,
            dst_node_id=node_id_of(owner),
            run_id=self.flower_run_id,
            group_id=str(task_round),
            ttl_seconds=ttl_seconds,
        )

    def _sent(self, owner: str, name: uuid.UUID) -> bool:
        return (
            self.target.request_path(owner, name).exists() or self.target.response_path(owner, name).exists()
        )

    def stop_targets(self, owners: tuple[str, ...]) -> list[str]:
        """The owners that have started this app (the others have nothing to stop)."""
        return [owner for owner in owners if self.target.rpc_dir(owner).is_dir()]

    def send_stop(self, owners: tuple[str, ...], reason: str) -> list[str]:
        """Ask each owner's main.py to exit (syft-flwr's SYSTEM message, group 'final')."""
        sent = []
        for owner in self.stop_targets(owners):
            request_id = uuid.uuid5(_STOP_NAMESPACE, f"{self.run_id}|stop|{owner}")
            stop_id = task_id_for_request(request_id)
            self.state.stop_requests[stop_id] = owner
            self.state.register_resends(stop_id)
            if self.target.request_path(owner, request_id).exists():
                continue
            self._write_stop(owner, request_id, reason)
            sent.append(owner)
        return sent

    def resend_stop(self, stop_id: str, reason: str) -> bool:
        """Send a stop message again under its next name; False when out of resends."""
        owner = self.state.stop_requests.get(stop_id)
        count = self.state.resends.get(stop_id, 0)
        if owner is None or count >= len(resend_ids(stop_id)):
            return False
        self.state.resends[stop_id] = count + 1
        self._write_stop(owner, resend_ids(stop_id)[count], reason)
        return True

    def _write_stop(self, owner: str, request_id: uuid.UUID, reason: str) -> None:
        now = time.time()
        body = flower_codec.stop_body(dst_node_id=node_id_of(owner), run_id=self.flower_run_id, reason=reason)
        # Not the round margin (which may be 0): a stop must outlive a slow sync.
        expires = now + max(STOP_EXPIRY_SECONDS, self.expiry_margin_seconds)
        self._write_request(owner, request_id, body, now, expires)

    def _write_request(
        self, owner: str, request_id: uuid.UUID, body: bytes, now: float, expires: float
    ) -> int:
        if self.keys is not None:
            try:
                body = self.keys.seal(owner, body)
            except SealError as exc:
                log.error(
                    "syft_flwr.request_not_written", owner=owner, reason=str(exc.reason), why=exc.detail
                )
                return 0  # the owner is not present without keys: this is a race with its did.json
        chunks = encode_request(
            request_id=request_id,
            sender=self.target.aggregator,
            url=self.target.url(owner),
            body=body,
            created=now,
            expires=expires,
        )
        path = self.target.request_path(owner, request_id)
        link = first_link_below(self.target.datasites_dir, path)
        if link is not None:
            log.error("syft_flwr.request_not_written", owner=owner, why=f"{link} is a symlink")
            return 0  # the owner times out, and the reason is in the log
        path.parent.mkdir(parents=True, exist_ok=True)
        # Lost from the page cache in a crash, it is rewritten from the round log on restart.
        return atomic_write(path, chunks, durable=False)
