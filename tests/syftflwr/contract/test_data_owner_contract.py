"""What a syft-flwr 0.5.3 data owner accepts and answers, pinned with the real packages.

These are the facts the daemon's syft-flwr wire format is built on; if an upgrade of
syft-flwr, syft-rpc, syft-event or flwr changes one of them, a test here says which. They run
in the syft-flwr environment only (see conftest.py), in-process: the DO's request handler
(``RequestProcessor``) directly, and its file watcher (``SyftEvents``) in a thread.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from contract_support import (
    AGGREGATOR,
    AGGREGATOR_NODE_ID,
    MESSAGES_URL,
    OWNER,
    RPC_APP,
    make_processor,
    request_processor,
)
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode, MessageType
from syft_flwr.serde import bytes_to_flower_message, flower_message_to_bytes
from syft_flwr.utils import str_to_int
from syft_rpc import rpc
from syft_rpc.protocol import SyftRequest, SyftResponse


def _from_syft_grid(
    content: RecordDict, message_type: str, *, group_id: str, run_id: int = 42, ttl: float = 60.0
) -> Message:
    """A message as syft-flwr's SyftGrid sends it (run_id and src_node_id set behind the API)."""
    message = Message(
        content=content, dst_node_id=str_to_int(OWNER), message_type=message_type, ttl=ttl, group_id=group_id
    )
    message.metadata.__dict__["_run_id"] = run_id
    message.metadata.__dict__["_src_node_id"] = AGGREGATOR_NODE_ID
    return message


def _instruction(
    server_round: int,
    *,
    message_type: str = MessageType.TRAIN,
    group_id: str = "",
    run_id: int = 42,
    ttl: float = 60.0,
) -> Message:
    """A train (or other) instruction for one server round, as SyftGrid sends it."""
    arrays = [np.arange(12, dtype=np.float32).reshape(4, 3), np.array([1.0, 2.0, 3.0], dtype=np.float32)]
    content = RecordDict(
        {"arrays": ArrayRecord(arrays), "config": ConfigRecord({"server-round": server_round})}
    )
    return _from_syft_grid(content, message_type, group_id=group_id, run_id=run_id, ttl=ttl)


def _stop_message() -> Message:
    content = RecordDict({"config": ConfigRecord({"action": "stop", "reason": "done"})})
    return _from_syft_grid(content, MessageType.SYSTEM, group_id="final")


# --------------------------------------------------------------------------- the handler


def test_train_reply_carries_positional_arrays_and_the_request_metadata(client_app: Any) -> None:
    processor, _ = make_processor(client_app)
    request = _instruction(1, group_id="r1")
    before = time.time()
    body = processor.process(flower_message_to_bytes(request))
    assert isinstance(body, bytes)
    reply = bytes_to_flower_message(body)
    assert not reply.has_error()
    meta = reply.metadata
    # The reply is addressed back by node ids; nothing else identifies the request.
    assert (meta.src_node_id, meta.dst_node_id) == (str_to_int(OWNER), AGGREGATOR_NODE_ID)
    assert (meta.run_id, meta.group_id, meta.message_type) == (42, "r1", MessageType.TRAIN)
    # SyftGrid sends message_id "" (it refuses anything else), so reply_to_message_id is "".
    assert meta.message_id == "" and meta.reply_to_message_id == ""
    # Flower caps the reply's ttl at what is left of the request's.
    assert 0 < meta.ttl <= 60.0 and meta.created_at >= before
    # ArrayRecord(list_of_ndarrays) names the arrays by position: "0", "1", ...
    record = cast(ArrayRecord, reply.content["arrays"])
    assert list(record.keys()) == ["0", "1"]
    got = record.to_numpy_ndarrays()
    sent = cast(ArrayRecord, request.content["arrays"]).to_numpy_ndarrays()
    for g, s in zip(got, sent, strict=True):
        assert g.dtype == np.float32 and np.array_equal(g, s + np.float32(0.5))
    assert reply.content["metrics"]["num-examples"] == 7


def test_a_request_with_an_expired_flower_ttl_is_still_answered(client_app: Any) -> None:
    # The DO does not look at Flower's ttl; the reply's ttl just comes out negative.
    processor, _ = make_processor(client_app)
    request = _instruction(1, ttl=1.0)
    request.metadata.__dict__["_created_at"] = time.time() - 3600.0
    reply = bytes_to_flower_message(processor.process(flower_message_to_bytes(request)))
    assert not reply.has_error()
    assert reply.metadata.ttl < 0


def test_a_raising_client_app_is_answered_with_a_flower_error(client_app: Any) -> None:
    processor, _ = make_processor(client_app)
    body = processor.process(flower_message_to_bytes(_instruction(2, group_id="r2")))
    assert isinstance(body, bytes)
    reply = bytes_to_flower_message(body)
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "FLT_FAIL_ROUNDS" in reply.error.reason and OWNER in reply.error.reason
    assert (reply.metadata.group_id, reply.metadata.src_node_id) == ("r2", str_to_int(OWNER))


def test_the_stop_message_stops_the_owner_and_gets_no_body(client_app: Any) -> None:
    processor, events = make_processor(client_app)
    assert processor.process(flower_message_to_bytes(_stop_message())) is None
    assert events.stopped


def test_garbage_and_unknown_message_types_get_no_usable_reply(client_app: Any) -> None:
    processor, events = make_processor(client_app)
    # Not a Flower message: no reply body at all (the watcher then writes an empty 200).
    assert processor.process(b"\xff\xff\xff\xff") is None
    # A message type the ClientApp has no function for: a Flower error reply.
    body = processor.process(flower_message_to_bytes(_instruction(1, message_type=MessageType.QUERY)))
    reply = bytes_to_flower_message(body)
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert not events.stopped


# --------------------------------------------------------------------------- the request file


def test_a_syft_rpc_request_file_is_json_with_url_safe_base64_body(tmp_path: Path, client: Any) -> None:
    from syft_core import Client, SyftClientConfig

    aggregator_config = tmp_path / "agg.json"
    aggregator_config.write_text(
        json.dumps({"email": AGGREGATOR, "data_dir": str(client.workspace.data_dir)}), encoding="utf-8"
    )
    aggregator = Client(SyftClientConfig.load(aggregator_config))
    body = bytes(range(256)) * 3 + b"!"  # every byte value, and a length that needs padding
    future = rpc.send(
        url=rpc.make_url(OWNER, app_name=RPC_APP, endpoint="messages"),
        body=body,
        client=aggregator,
        cache=False,
    )
    folder = client.app_data(RPC_APP) / "rpc" / "messages" / AGGREGATOR
    path = folder / f"{future.id}.request"
    assert path.is_file()
    document = json.loads(path.read_text(encoding="utf-8"))
    assert set(document) == {"id", "sender", "url", "body", "headers", "created", "expires", "method"}
    assert document["id"] == str(future.id) and document["sender"] == AGGREGATOR
    assert document["url"] == MESSAGES_URL
    assert document["method"] == "GET" and document["headers"] == {}
    # pydantic writes bytes as URL-safe base64 with padding.
    assert "+" not in document["body"] and "/" not in document["body"] and document["body"].endswith("=")
    assert base64.urlsafe_b64decode(document["body"]) == body
    created = datetime.fromisoformat(document["created"])
    expires = datetime.fromisoformat(document["expires"])
    assert created.tzinfo is not None and expires - created == pytest.approx(
        timedelta(minutes=15), abs=timedelta(seconds=1)
    )


def test_a_minimal_request_needs_only_sender_and_url() -> None:
    request = SyftRequest.model_validate_json(json.dumps({"sender": AGGREGATOR, "url": MESSAGES_URL}))
    assert request.body is None and not request.is_expired
    # Standard base64 and missing padding are accepted too.
    document = {"sender": AGGREGATOR, "url": MESSAGES_URL, "body": "+/8"}
    request = SyftRequest.model_validate_json(json.dumps(document))
    assert request.body == b"\xfb\xff"


# --------------------------------------------------------------------------- the watcher


class _Watcher:
    """The DO's watcher, wired as syft_flwr.fl_orchestrator.flower_client wires it, on a thread."""

    def __init__(self, client: Any, client_app: Any) -> None:
        from syft_flwr.events.syft_events import SyftEvents

        self.adapter = SyftEvents(app_name=RPC_APP, client=client, cleanup_expiry="1d", cleanup_interval="1d")
        self.events = self.adapter.native_events
        processor = request_processor(client_app, self.adapter)
        self.adapter.on_request(
            "/messages", handler=lambda body: processor.process(body), auto_decrypt=False, encrypt_reply=False
        )
        # The sender's folder exists before the watch starts, so the watch covers it.
        self.folder = self.events.app_rpc_dir / "messages" / AGGREGATOR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.thread = threading.Thread(target=self.adapter.run_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()
        # The schema is published before the observer starts: wait for the observer too.
        _wait(lambda: (self.events.app_rpc_dir / "rpc.schema.json").is_file(), "the schema")
        _wait(self.events.obs.is_alive, "the observer")

    def stop(self) -> None:
        self.adapter.stop()
        self.thread.join(timeout=10)


@pytest.fixture
def watcher(client: Any, client_app: Any) -> Iterator[_Watcher]:
    running = _Watcher(client, client_app)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _wait(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _request_json(body: bytes, *, request_id: uuid.UUID, expires_in: float = 900.0) -> str:
    now = datetime.now(UTC)
    return SyftRequest(
        id=request_id,
        sender=AGGREGATOR,
        url=MESSAGES_URL,  # type: ignore[arg-type]
        body=body,
        created=now,
        expires=now + timedelta(seconds=expires_in),
    ).model_dump_json()


def _response(path: Path) -> SyftResponse:
    _wait(lambda: path.is_file() and path.stat().st_size > 0, f"{path.name}")
    # The DO writes the response in place: wait until it parses.
    deadline = time.monotonic() + 5
    while True:
        try:
            return SyftResponse.load(path)
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_a_request_renamed_into_place_is_answered_next_to_it(watcher: _Watcher) -> None:
    request_id = uuid.uuid4()
    temp = watcher.folder / f".{request_id}.request.tmp"
    temp.write_text(_request_json(flower_message_to_bytes(_instruction(1)), request_id=request_id))
    os.replace(temp, watcher.folder / f"{request_id}.request")
    response = _response(watcher.folder / f"{request_id}.response")
    assert response.status_code == 200 and response.id == request_id and response.sender == OWNER
    reply = bytes_to_flower_message(response.body)
    assert not reply.has_error() and reply.content["metrics"]["num-examples"] == 7
    # The response file is JSON, its body URL-safe base64 (as requests).
    document = json.loads((watcher.folder / f"{request_id}.response").read_text())
    assert base64.urlsafe_b64decode(document["body"]) == response.body


def test_a_request_read_while_still_being_written_is_lost_with_a_400(watcher: _Watcher) -> None:
    # The DO reads a request once, at its "created" event; "modified" events are not watched.
    request_id = uuid.uuid4()
    text = _request_json(flower_message_to_bytes(_instruction(1)), request_id=request_id)
    path = watcher.folder / f"{request_id}.request"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text[: len(text) // 2])
        handle.flush()
        response_path = path.with_suffix(".response")
        _wait(response_path.is_file, "the 400 response")
        handle.write(text[len(text) // 2 :])
    response = _response(response_path)
    assert response.status_code == 400
    assert (response.body or b"").startswith(b"Error loading request")
    # Complete now, the request is never looked at again.
    time.sleep(0.3)
    assert _response(response_path).status_code == 400


def test_an_expired_request_is_answered_419(watcher: _Watcher) -> None:
    request_id = uuid.uuid4()
    temp = watcher.folder / f".{request_id}.tmp"
    temp.write_text(_request_json(b"unused", request_id=request_id, expires_in=-1.0))
    os.replace(temp, watcher.folder / f"{request_id}.request")
    response = _response(watcher.folder / f"{request_id}.response")
    assert response.status_code == 419 and response.body == b"Request expired"


def test_the_response_is_named_by_the_json_id_not_the_file_name(watcher: _Watcher) -> None:
    request_id, file_id = uuid.uuid4(), uuid.uuid4()
    temp = watcher.folder / f".{file_id}.tmp"
    temp.write_text(_request_json(flower_message_to_bytes(_instruction(1)), request_id=request_id))
    os.replace(temp, watcher.folder / f"{file_id}.request")
    response = _response(watcher.folder / f"{request_id}.response")
    assert response.status_code == 200
    assert not (watcher.folder / f"{file_id}.response").exists()


def test_the_stop_message_is_answered_empty_and_ends_the_watcher(watcher: _Watcher) -> None:
    request_id = uuid.uuid4()
    temp = watcher.folder / f".{request_id}.tmp"
    temp.write_text(_request_json(flower_message_to_bytes(_stop_message()), request_id=request_id))
    os.replace(temp, watcher.folder / f"{request_id}.request")
    response = _response(watcher.folder / f"{request_id}.response")
    assert response.status_code == 200 and response.body is None
    watcher.thread.join(timeout=10)
    assert not watcher.thread.is_alive()
