"""The daemon's syft-flwr codec (protocols/syft_flwr) against the real syft-rpc and DO handler.

What the daemon writes must parse as syft-rpc parses it, and what a real DO answers must
decode with the daemon's reader. Runs in the syft-flwr environment (see conftest.py), with
the repository on PYTHONPATH.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

import numpy as np
from contract_support import AGGREGATOR, MESSAGES_URL, OWNER, make_processor
from flwr.common.constant import ErrorCode
from hypothesis import given, settings
from hypothesis import strategies as st
from syft_core.url import SyftBoxURL
from syft_flwr.serde import bytes_to_flower_message
from syft_flwr.utils import str_to_int
from syft_rpc.protocol import SyftRequest, SyftResponse, SyftStatus

from fl_orchestrator.protocols.syft_flwr import envelope, flower_codec

MODEL = {
    "w0": np.arange(12, dtype=np.float32).reshape(4, 3),
    "w1": np.array([0.5, -1.25, 2.0], dtype=np.float32),
}


def _request(server_round: int, *, purpose: str = "train", content_format: str = "message") -> bytes:
    content = flower_codec.round_content(
        MODEL, {"server-round": server_round, "lr": 0.1}, purpose=purpose, content_format=content_format
    )
    return flower_codec.request_body(
        content,
        purpose=purpose,
        dst_node_id=envelope.node_id_of(OWNER),
        run_id=7,
        group_id=f"r{server_round}",
        ttl_seconds=30.0,
    )


def test_node_ids_are_syft_flwrs() -> None:
    assert envelope.node_id_of(OWNER) == str_to_int(OWNER)


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=300))
def test_a_request_envelope_parses_as_syft_rpc_parses_it(body: bytes) -> None:
    request_id = uuid.uuid4()
    now = time.time()
    chunks = envelope.encode_request(
        request_id=request_id, sender=AGGREGATOR, url=MESSAGES_URL, body=body, created=now, expires=now + 60
    )
    request = SyftRequest.model_validate_json(b"".join(chunks))
    assert (request.id, request.sender, str(request.url)) == (request_id, AGGREGATOR, MESSAGES_URL)
    assert (request.body or b"") == body
    assert not request.is_expired
    assert request.expires - request.created == timedelta(seconds=60)


@settings(max_examples=60, deadline=None)
@given(body=st.one_of(st.none(), st.binary(max_size=300)), status=st.sampled_from([200, 400, 419, 500]))
def test_a_syft_rpc_response_decodes_with_the_daemons_reader(body: bytes | None, status: int) -> None:
    response = SyftResponse(
        id=uuid.uuid4(),
        sender=OWNER,
        url=SyftBoxURL(MESSAGES_URL),
        body=body,
        status_code=SyftStatus(status),
    )
    decoded = envelope.decode_response(response.model_dump_json().encode())
    assert (decoded.id, decoded.sender, decoded.status_code) == (response.id, OWNER, status)
    assert decoded.body == body


def test_a_train_request_is_answered_and_the_reply_parses(client_app: Any) -> None:
    processor, _ = make_processor(client_app)
    body = processor.process(_request(1))
    assert isinstance(body, bytes)
    reply = flower_codec.parse_reply(body)
    assert reply.ok and reply.group_id == "r1" and reply.src_node_id == envelope.node_id_of(OWNER)
    assert [name for name, _ in reply.arrays] == ["0", "1"]
    for (_, got), want in zip(reply.arrays, MODEL.values(), strict=True):
        assert got.dtype == np.float32 and np.array_equal(got, want + np.float32(0.5))
    assert reply.metrics["num-examples"] == 7


def test_a_raising_client_app_parses_as_a_failure(client_app: Any) -> None:
    processor, _ = make_processor(client_app)
    reply = flower_codec.parse_reply(processor.process(_request(2)))
    assert not reply.ok
    assert reply.error_code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "FLT_FAIL_ROUNDS" in reply.error_reason


def test_the_daemons_stop_message_stops_a_data_owner(client_app: Any) -> None:
    processor, events = make_processor(client_app)
    body = flower_codec.stop_body(dst_node_id=envelope.node_id_of(OWNER), run_id=7, reason="job done")
    assert processor.is_stop_signal(bytes_to_flower_message(body))
    assert processor.process(body) is None
    assert events.stopped


def test_a_numpy_client_reads_the_legacy_train_request_and_its_fitres_parses(legacy_client_app: Any) -> None:
    processor, _ = make_processor(legacy_client_app)
    reply = flower_codec.parse_reply(processor.process(_request(1, content_format="legacy")))
    assert reply.ok and reply.group_id == "r1" and reply.message_type == "train"
    assert [name for name, _ in reply.arrays] == ["0", "1"]  # legacy Parameters carry no names
    for (_, got), want in zip(reply.arrays, MODEL.values(), strict=True):
        assert got.dtype == np.float32 and np.array_equal(got, want + np.float32(0.5))
    assert reply.metrics == {"num-examples": 7, "train_loss": 0.5}


def test_a_numpy_client_reads_the_legacy_evaluate_request_and_its_loss_parses(legacy_client_app: Any) -> None:
    processor, _ = make_processor(legacy_client_app)
    body = processor.process(_request(1, purpose="evaluate", content_format="legacy"))
    reply = flower_codec.parse_reply(body)
    mean = float(np.mean(np.concatenate([a.astype(np.float64).ravel() for a in MODEL.values()])))
    assert reply.ok and reply.message_type == "evaluate" and reply.arrays == []
    assert reply.metrics["num-examples"] == 7
    assert reply.metrics["loss"] == reply.metrics["eval_mean"] and abs(reply.metrics["loss"] - mean) < 1e-9


def test_a_numpy_client_raising_in_fit_parses_as_a_failure(legacy_client_app: Any) -> None:
    processor, _ = make_processor(legacy_client_app)
    reply = flower_codec.parse_reply(processor.process(_request(2, content_format="legacy")))
    assert not reply.ok and "FLT_FAIL_ROUNDS" in reply.error_reason


def test_each_format_sent_to_the_other_kind_of_client_app_names_the_key_to_change(
    client_app: Any, legacy_client_app: Any
) -> None:
    # A Message-API request to a NumPyClient owner, and a legacy one to an @app.train() owner.
    for app, sent, fix in ((legacy_client_app, "message", "legacy"), (client_app, "legacy", "message")):
        processor, _ = make_processor(app)
        reply = flower_codec.parse_reply(processor.process(_request(1, content_format=sent)))
        assert not reply.ok
        hint = flower_codec.content_format_hint(reply.error_reason)
        assert f'content_format = "{fix}"' in hint, reply.error_reason
