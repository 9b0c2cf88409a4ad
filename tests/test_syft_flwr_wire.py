"""The syft-flwr edge's Flower-free parts: paths, the syft-rpc envelope, the config keys.

The parts that need Flower (the message codec, the reply translator, a real run with
syft-flwr's own data owners) are tested by tests/test_syft_flwr.py in an environment
with syft-flwr installed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fl_orchestrator.config import ConfigError, config_from_table
from fl_orchestrator.protocols.syft_flwr.envelope import (
    EnvelopeError,
    decode_response,
    encode_request,
    node_id_of,
)
from fl_orchestrator.protocols.syft_flwr.layout import (
    SyftFlwrKind,
    SyftFlwrLayout,
    first_link_below,
    request_id_for_task,
    task_id_for_request,
)

from support.jobs import job_table

ROOT = Path("/box")
AGG = "agg@example.org"
OWNER = "do1@example.org"
LAYOUT = SyftFlwrLayout(ROOT, "agg@example.org_app_1700000000", AGG)


def response_bytes(**fields: object) -> bytes:
    document: dict[str, object] = {
        "id": "6f1c1a52-64a4-4d3e-9a53-0a4be6f0c7d1",
        "sender": OWNER,
        "url": LAYOUT.url(OWNER),
        "body": base64.urlsafe_b64encode(b"\xfb\xff\x00payload").decode(),
        "headers": {},
        "created": "2026-11-29T15:00:00.123456+00:00",
        "expires": "2026-11-29T15:15:00+00:00",
        "status_code": 200,
    }
    document.update(fields)
    return json.dumps(document, separators=(",", ":")).encode()


# ---- layout ------------------------------------------------------------------------------


def test_paths_follow_syft_rpc() -> None:
    rid = uuid.UUID("6f1c1a52-64a4-4d3e-9a53-0a4be6f0c7d1")
    base = ROOT / "datasites" / OWNER / "app_data" / "flwr" / LAYOUT.app_name / "rpc"
    assert LAYOUT.request_path(OWNER, rid) == base / "messages" / AGG / f"{rid}.request"
    assert LAYOUT.response_path(OWNER, rid) == base / "messages" / AGG / f"{rid}.response"
    assert LAYOUT.schema_path(OWNER) == base / "rpc.schema.json"
    assert LAYOUT.url(OWNER) == f"syft://{OWNER}/app_data/flwr/{LAYOUT.app_name}/rpc/messages"


def test_classify_reads_responses_and_presence() -> None:
    rid = uuid.uuid4()
    found = LAYOUT.classify(LAYOUT.response_path(OWNER, rid))
    assert found is not None and found.kind == SyftFlwrKind.RESPONSE and found.request_id == rid
    assert found.owner == OWNER
    presence = LAYOUT.classify(LAYOUT.schema_path(OWNER))
    assert presence is not None and presence.kind == SyftFlwrKind.PRESENCE


@pytest.mark.parametrize(
    "relative",
    [
        "../etc/passwd",
        f"{OWNER}/app_data/flwr/other_app/rpc/messages/{AGG}/6f1c1a52-64a4-4d3e-9a53-0a4be6f0c7d1.response",
        f"{OWNER}/app_data/fl_orchestrator/job/results/x.result",
        f"{OWNER}/app_data/flwr/{LAYOUT.app_name}/rpc/../rpc/rpc.schema.json",
    ],
)
def test_classify_ignores_paths_outside_the_app(relative: str) -> None:
    assert LAYOUT.classify(ROOT / "datasites" / relative) is None


@pytest.mark.parametrize(
    "tail",
    [
        f"messages/{AGG}/not-a-uuid.response",
        f"messages/{AGG}/6f1c1a52-64a4-4d3e-9a53-0a4be6f0c7d1.request",
        "messages/someone@else.org/6f1c1a52-64a4-4d3e-9a53-0a4be6f0c7d1.response",
        f"messages/{AGG}/deeper/6f1c1a52-64a4-4d3e-9a53-0a4be6f0c7d1.response",
    ],
)
def test_only_answers_to_this_aggregator_are_responses(tail: str) -> None:
    found = LAYOUT.classify(LAYOUT.rpc_dir(OWNER) / tail)
    assert found is not None and found.kind == SyftFlwrKind.IGNORED


def test_task_ids_and_request_ids_map_both_ways() -> None:
    task = "0123456789abcdef0123456789abcdef"
    assert task_id_for_request(request_id_for_task(task)) == task


def test_node_ids_are_crc32_of_the_email() -> None:
    # zlib.crc32(b"do1@example.org"), as syft-flwr's str_to_int computes it.
    import zlib

    assert node_id_of(OWNER) == zlib.crc32(OWNER.encode())
    assert node_id_of(OWNER) != node_id_of("do2@example.org")


# ---- envelope ----------------------------------------------------------------------------


def test_request_is_compact_json_with_urlsafe_base64_body() -> None:
    rid = uuid.uuid4()
    body = bytes(range(256))
    data = b"".join(
        encode_request(
            request_id=rid, sender=AGG, url=LAYOUT.url(OWNER), body=body, created=1.7e9, expires=1.7e9 + 60
        )
    )
    document = json.loads(data)
    assert list(document) == ["id", "sender", "url", "body", "headers", "created", "expires", "method"]
    assert document["id"] == str(rid)
    assert base64.urlsafe_b64decode(document["body"]) == body
    assert "+" not in document["body"] and "/" not in document["body"]
    assert document["expires"] == "2023-11-14T22:14:20+00:00"


def test_response_decodes() -> None:
    response = decode_response(response_bytes())
    assert response.sender == OWNER and response.status_code == 200
    assert response.body == b"\xfb\xff\x00payload"
    assert response.expires is not None and response.expires.minute == 15


def test_both_base64_alphabets_are_read() -> None:
    standard = base64.b64encode(b"\xfb\xff\xfe").decode()
    assert decode_response(response_bytes(body=standard)).body == b"\xfb\xff\xfe"


def test_a_response_without_body_or_status_is_a_default_200() -> None:
    data = json.loads(response_bytes())
    del data["status_code"]
    data["body"] = None
    response = decode_response(json.dumps(data).encode())
    assert response.status_code == 200 and response.body is None


@pytest.mark.parametrize("cut", [0, 1, 40, -1, -10])
def test_a_response_cut_short_may_still_be_arriving(cut: int) -> None:
    data = response_bytes()[:cut]
    with pytest.raises(EnvelopeError) as caught:
        decode_response(data)
    assert not caught.value.complete


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"[1, 2]", "not an object"),
        (b'{"id": "x"} }', "not JSON"),
        (b"\xff\xfe{", "not"),
        (response_bytes(status_code="200"), "status_code"),
        (response_bytes(status_code=99), "status_code"),
        (response_bytes(id="nope"), "'id'"),
        (response_bytes(body="***"), "not base64"),
        (response_bytes(sender=7), "'sender'"),
        (response_bytes(expires="yesterday"), "'expires'"),
    ],
)
def test_a_complete_but_broken_response_says_what_is_wrong(data: bytes, needle: str) -> None:
    with pytest.raises(EnvelopeError) as caught:
        decode_response(data)
    assert caught.value.complete
    assert needle in caught.value.detail


@pytest.mark.parametrize(
    "data",
    [b"[" * 100_000 + b"]" * 100_000, b'{"id": ' + b"9" * 5000 + b"}"],
    ids=["deeply nested", "huge integer"],
)
def test_hostile_json_is_a_complete_refusal_not_a_crash(data: bytes) -> None:
    with pytest.raises(EnvelopeError) as caught:
        decode_response(data)
    assert caught.value.complete


def test_a_response_missing_its_id_is_refused() -> None:
    data = json.loads(response_bytes())
    del data["id"]
    with pytest.raises(EnvelopeError, match="no 'id' field"):
        decode_response(json.dumps(data).encode())


@given(st.binary(max_size=300))
def test_decoding_any_bytes_returns_or_raises_envelope_error(data: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        decode_response(data)


@given(st.integers(min_value=0, max_value=400))
def test_every_prefix_of_a_valid_response_is_not_yet_or_valid(cut: int) -> None:
    data = response_bytes()
    try:
        decode_response(data[:cut])
    except EnvelopeError as exc:
        assert not exc.complete, (cut, exc.detail)


# ---- config ------------------------------------------------------------------------------


def load(tmp_path: Path, **sections: dict[str, object]) -> object:
    return config_from_table(job_table(**sections), base_dir=tmp_path)


def test_native_is_the_default_protocol(tmp_path: Path) -> None:
    config = config_from_table(job_table(), base_dir=tmp_path)
    assert config.job.protocol == "native"
    assert config.syft_flwr.app_name is None


def test_an_unknown_protocol_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, job={"protocol": "flower-grpc"})
    assert "job.protocol" in caught.value.line() and "syft-flwr" in caught.value.line()


def test_syft_flwr_needs_the_app_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, job={"protocol": "syft-flwr"})
    assert "syft_flwr.app_name" in caught.value.line() and "[tool.syft_flwr]" in caught.value.line()


@pytest.mark.parametrize("name", ["..", "a/b", "", "x" * 201, "app name"])
def test_an_app_name_that_is_not_one_folder_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, job={"protocol": "syft-flwr"}, syft_flwr={"app_name": name})
    assert "syft_flwr.app_name" in caught.value.line()


def test_unknown_syft_flwr_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, syft_flwr={"app": "x"})
    assert "syft_flwr.app" in caught.value.line()


def test_without_flower_installed_the_error_names_the_extra(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    try:
        import flwr  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("flwr is installed here")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, job={"protocol": "syft-flwr"}, syft_flwr={"app_name": "a@b.org_app_1"})
    assert "fl-orchestrator[syft-flwr]" in caught.value.line()


def test_a_symlinked_folder_on_the_way_to_a_request_is_found(tmp_path: Path) -> None:
    layout = SyftFlwrLayout(tmp_path, "app_1", AGG)
    request = layout.request_path(OWNER, uuid.uuid4())
    assert first_link_below(layout.datasites_dir, request) is None  # nothing exists yet
    layout.rpc_dir(OWNER).mkdir(parents=True)
    assert first_link_below(layout.datasites_dir, request) is None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (layout.rpc_dir(OWNER) / "messages").symlink_to(elsewhere)
    assert first_link_below(layout.datasites_dir, request) == layout.rpc_dir(OWNER) / "messages"
