"""Encrypted syft-flwr mode against syft-crypto, syft-rpc and syft-flwr's own owner code.

Runs in the syft-flwr environment. The owner side is the real chain: syft-crypto's
keys for the owner, syft-event's way of opening a request (EncryptedPayload, then
decrypt_message), syft-flwr's RequestProcessor and MessageHandler in encrypted mode,
and syft-rpc's ``reply_to(..., encrypt=True)`` writing the response.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("syft_flwr")

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from syft_core import Client
from syft_core.config import SyftClientConfig
from syft_crypto import EncryptedPayload, bootstrap_user, decrypt_message
from syft_flwr.fl_orchestrator.flower_client import MessageHandler, RequestProcessor
from syft_rpc import rpc
from syft_rpc.protocol import SyftRequest

from fl_orchestrator.core.reasons import Reason
from fl_orchestrator.protocols.syft_flwr.keys import AggregatorKeys, KeysError
from fl_orchestrator.protocols.syft_flwr.layout import SyftFlwrLayout, request_id_for_task
from fl_orchestrator.protocols.syft_flwr.publisher import SyftFlwrPublisher
from fl_orchestrator.protocols.syft_flwr.replies import (
    ReplyTranslator,
    SyftFlwrState,
    Translated,
    Unusable,
)
from fl_orchestrator.storage.job_state import StartRefused

AGG = "agg@example.org"
OWNER = "do1@example.org"
PLAIN_OWNER = "do2@example.org"
APP = "agg@example.org_fltapp_1700000000"
TASK = "0123456789abcdef0123456789abcdef"
MODEL = {"w": np.arange(12, dtype=np.float32).reshape(4, 3)}


def owner_client(root: Path, email: str) -> Client:
    """A syft-core client as a data owner has one, its keys bootstrapped by syft-crypto."""
    folder = root.parent / "owners" / email
    folder.mkdir(parents=True, exist_ok=True)
    config = SyftClientConfig(
        email=email,
        data_dir=root,
        server_url="http://127.0.0.1:9/",
        client_url="http://127.0.0.1:9/",
        path=folder / "config.json",
    )
    client = Client(config)
    bootstrap_user(client)
    return client


class Setup:
    def __init__(self, tmp: Path, *, encrypted: bool = True) -> None:
        self.root = tmp / "box"
        self.target = SyftFlwrLayout(self.root, APP, AGG)
        self.state_dir = tmp / "state"
        self.keys = (
            AggregatorKeys(
                email=AGG,
                datasites_dir=self.target.datasites_dir,
                state_dir=self.state_dir,
                server_url="https://syftbox.net",
            )
            if encrypted
            else None
        )
        self.state = SyftFlwrState()
        self.publisher = SyftFlwrPublisher(
            (OWNER, PLAIN_OWNER),
            target=self.target,
            state=self.state,
            run_id="run-1",
            expiry_margin_seconds=60,
            keys=self.keys,
        )
        self.translator = ReplyTranslator(
            self.target, "job", self.state, max_file_bytes=1 << 30, keys=self.keys
        )
        self.publisher.prepare()
        self.owner = owner_client(self.root, OWNER)

    def dispatch(self, owner: str = OWNER) -> Path:
        broadcast = self.publisher.write_model(1, MODEL)
        self.publisher.write_tasks(
            broadcast, {owner: TASK}, attempt=1, deadline=4e9, config={"server-round": 1}, rnd=1
        )
        return self.target.request_path(owner, request_id_for_task(TASK))

    def owner_answers(self, request_path: Path, app: ClientApp) -> Path:
        """What a syft-flwr 0.5.3 owner with encryption on does with the request file."""
        request = SyftRequest.load(request_path)
        payload = EncryptedPayload.model_validate_json(request.body)  # syft-event's auto-decrypt
        request.body = decrypt_message(payload, client=self.owner).encode()
        handler = MessageHandler(app, Context(1, 2, {}, RecordDict(), {}), encryption_enabled=True)

        class Events:
            def stop(self) -> None:
                raise AssertionError("not a stop message")

        reply = RequestProcessor(handler, Events(), OWNER).process(request.body)  # type: ignore[arg-type]
        assert isinstance(reply, str)  # base64, to be encrypted by syft-rpc
        rpc.reply_to(request, body=reply, client=self.owner, encrypt=True)
        return self.target.response_path(OWNER, request_id_for_task(TASK))


def adding(delta: float, count: int) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = [a + np.asarray(delta, a.dtype) for a in msg.content["arrays"].to_numpy_ndarrays()]
        metrics = MetricRecord({"num-examples": count})
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)

    return app


def test_the_keys_live_in_the_state_folder_and_the_did_is_published(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    assert setup.keys is not None
    (key_file,) = setup.keys.keys_dir.rglob("pvt.jwks.json")
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(setup.keys.keys_dir).st_mode) == 0o700
    assert not key_file.resolve().is_relative_to(setup.root.resolve())
    did = json.loads(setup.keys.did_file.read_text())
    assert did["id"] == "did:web:syftbox.net:agg%40example.org"
    assert setup.keys.ensure() == "loaded"
    # Lost DID: published again from the same keys, the same document.
    setup.keys.did_file.unlink()
    assert setup.keys.ensure() == "published"
    assert json.loads(setup.keys.did_file.read_text()) == did


def test_keys_and_a_did_that_disagree_refuse_the_start_with_the_fix(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    assert setup.keys is not None
    (key_file,) = setup.keys.keys_dir.rglob("pvt.jwks.json")
    saved = key_file.read_bytes()
    key_file.unlink()  # the state folder was lost, the published DID was not
    with pytest.raises(StartRefused, match=r"restore .* or delete"):
        setup.publisher.prepare()
    # Other keys than the published DID's.
    key_file.write_bytes(saved)
    other = Setup(tmp_path / "other")
    setup.keys.did_file.write_text(other.keys.did_file.read_text())  # type: ignore[union-attr]
    with pytest.raises(KeysError, match="does not match"):
        setup.keys.ensure()


def test_a_key_file_torn_by_a_kill_before_any_did_is_made_again(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    assert setup.keys is not None
    (key_file,) = setup.keys.keys_dir.rglob("pvt.jwks.json")
    key_file.write_text(key_file.read_text()[:40])  # kill -9 in the middle of the first write
    with pytest.raises(KeysError, match="cannot be read"):  # a DID went out: never replaced silently
        setup.keys.ensure()
    setup.keys.did_file.unlink()  # ... the kill came before the DID was published
    assert setup.keys.ensure() == "created"
    assert setup.keys.ensure() == "loaded"


def test_a_request_is_sealed_for_its_owner_and_its_encrypted_reply_is_read(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    request_path = setup.dispatch()
    raw = request_path.read_bytes()
    body = SyftRequest.load(request_path).body
    assert json.loads(body)["receiver"] == OWNER and json.loads(body)["sender"] == AGG
    assert base64.b64encode(MODEL["w"].tobytes()) not in raw  # no weights in the clear
    outcome, _ = setup.translator.translate(setup.owner_answers(request_path, adding(1.0, 7)), OWNER, TASK)
    assert isinstance(outcome, Translated) and outcome.ok
    assert outcome.message.num_examples == 7
    (array,) = outcome.message.arrays.values()
    np.testing.assert_array_equal(array, MODEL["w"] + 1)


def test_a_tampered_or_forged_reply_is_a_counted_failure_and_quarantined(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    response_path = setup.owner_answers(setup.dispatch(), adding(1.0, 7))
    document = json.loads(response_path.read_text())
    payload = json.loads(base64.urlsafe_b64decode(document["body"]))
    for field, value in (("ciphertext", base64.b64encode(b"x" * 40).decode()), ("sender", PLAIN_OWNER)):
        forged = {**payload, field: value}
        document["body"] = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode()
        response_path.write_text(json.dumps(document))
        outcome, _ = setup.translator.translate(response_path, OWNER, TASK)
        assert isinstance(outcome, Unusable) and outcome.reason == Reason.UNDECRYPTABLE
        assert outcome.failure is not None and outcome.failure.message.error_type == "Undecryptable"


def test_an_owner_without_published_keys_gets_no_request_and_is_told_why(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    assert setup.keys is not None and not setup.keys.has_public_key(PLAIN_OWNER)
    request_path = setup.dispatch(PLAIN_OWNER)
    assert not request_path.exists()
    assert "SYFT_FLWR_ENCRYPTION_ENABLED=false" in setup.keys.no_key_hint(PLAIN_OWNER)


def test_an_encrypted_reply_to_a_plaintext_job_says_to_turn_encryption_on(tmp_path: Path) -> None:
    encrypted = Setup(tmp_path / "e")
    response = encrypted.owner_answers(encrypted.dispatch(), adding(1.0, 7))
    plain = Setup(tmp_path / "p", encrypted=False)
    plain.dispatch()
    target = plain.target.response_path(OWNER, request_id_for_task(TASK))
    target.write_bytes(response.read_bytes())
    outcome, _ = plain.translator.translate(target, OWNER, TASK)
    assert isinstance(outcome, Translated) and not outcome.ok
    assert outcome.message.error_type == "EncryptedReply"
    assert "encryption = false: set it to true" in (outcome.message.error_message or "")
