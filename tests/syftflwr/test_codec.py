"""The syft-flwr codec against syft-flwr's own classes (runs in the syft-flwr environment).

Requests are read back with syft-rpc's SyftRequest and syft-flwr's serde and fed to
syft-flwr's own data-owner handler; responses are written with syft-rpc's
SyftResponse, so both directions are checked against the real implementation.
"""

from __future__ import annotations

import json
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import structlog.testing

pytest.importorskip("syft_flwr")

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from syft_core.url import SyftBoxURL
from syft_flwr.fl_orchestrator.flower_client import MessageHandler, RequestProcessor
from syft_flwr.serde import bytes_to_flower_message
from syft_rpc.protocol import SyftRequest, SyftResponse

from fl_orchestrator.config.schema import LimitsSection
from fl_orchestrator.core.reasons import Reason
from fl_orchestrator.intake.reader import Inbound, InboundReader
from fl_orchestrator.protocols.contract import Broadcast
from fl_orchestrator.protocols.syft_flwr.keys import ENCRYPTION_HINT
from fl_orchestrator.protocols.syft_flwr.layout import SyftFlwrLayout, request_id_for_task
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
from fl_orchestrator.protocols.syft_flwr.wire import SyftFlwrWire
from fl_orchestrator.wire.layout import Classified, FileKind, JobLayout
from fl_orchestrator.wire.messages import ResultMessage, encode_result_frames, model_spec

AGG = "agg@example.org"
OWNERS = ("do1@example.org", "do2@example.org")
APP = "agg@example.org_fltapp_1700000000"
TASK = "0123456789abcdef0123456789abcdef"
MODEL = {"w": np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.zeros(3, dtype=np.float32)}


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.target = SyftFlwrLayout(tmp / "box", APP, AGG)
        self.state = SyftFlwrState()
        self.publisher = SyftFlwrPublisher(
            OWNERS, target=self.target, state=self.state, run_id="run-1", expiry_margin_seconds=60
        )
        self.translator = ReplyTranslator(self.target, "job", self.state, max_file_bytes=1 << 30)
        self.wire = SyftFlwrWire(self.target, OWNERS, self.state, self.publisher, self.translator)
        self.reader = InboundReader(
            JobLayout(tmp / "box", "job", AGG), frozenset(OWNERS), model_spec(MODEL), LimitsSection()
        )

    def dispatch(self, tasks: dict[str, str], action: str = "train", rnd: int = 1) -> Broadcast:
        broadcast = self.publisher.write_model(rnd, MODEL)
        self.publisher.write_tasks(
            broadcast,
            tasks,
            attempt=1,
            deadline=4e9,
            config={"lr": 0.1, "server-round": rnd},
            action=action,
            rnd=rnd,
        )
        return broadcast

    def request(self, owner: str, task: str = TASK) -> SyftRequest:
        return SyftRequest.load(self.target.request_path(owner, request_id_for_task(task)))

    def respond(
        self, owner: str, body: bytes | None, task: str = TASK, status: int = 200, sender: str = ""
    ) -> Path:
        request_id = request_id_for_task(task)
        response = SyftResponse(
            id=request_id,
            sender=sender or owner,
            url=SyftBoxURL(self.target.url(owner)),
            body=body,
            status_code=status,
        )
        path = self.target.response_path(owner, request_id)
        response.dump(path)
        return path

    def translate(self, path: Path, owner: str, task: str = TASK) -> object:
        return self.translator.translate(path, owner, task)[0]

    def read(self, path: Path, owner: str) -> object:
        """What the shared intake gets for this file from the adapter (with the shared validator)."""
        return self.wire.read(path, Classified(owner, FileKind.RESULT), self.reader)

    def native(self, translated: Translated) -> ResultMessage:
        """The result as its kept native copy holds it, decoded and checked as a native file is."""
        data = b"".join(bytes(frame) for frame in encode_result_frames(translated.message))
        result, _, _ = self.reader.check_result(data, translated.task_id)
        return result


def client_reply(request: SyftRequest, app: ClientApp) -> bytes:
    """Answer a request exactly as a syft-flwr data owner does (plaintext mode)."""
    handler = MessageHandler(app, Context(1, 2, {}, RecordDict(), {}), encryption_enabled=False)

    class Events:
        def stop(self) -> None:
            raise AssertionError("not a stop message")

    processor = RequestProcessor(handler, Events(), "owner")  # type: ignore[arg-type]
    reply = processor.process(request.body)
    assert isinstance(reply, bytes)
    return reply


def adding(delta: float, count: int, *, fail: bool = False) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if fail:
            raise RuntimeError("disk full")
        arrays = [a + np.asarray(delta, a.dtype) for a in msg.content["arrays"].to_numpy_ndarrays()]
        metrics = MetricRecord({"num-examples": count, "loss": 0.25, "hist": [1.0, 2.0]})
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": count, "accuracy": 0.5})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def test_requests_read_back_with_syft_rpc_and_flower(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK})
    request = setup.request(OWNERS[0])
    assert request.sender == AGG and str(request.url) == setup.target.url(OWNERS[0])
    assert request.id == uuid.UUID(hex=TASK)
    assert not request.is_expired
    message = bytes_to_flower_message(request.body)
    meta = message.metadata
    assert (meta.src_node_id, meta.dst_node_id) == (1, zlib.crc32(OWNERS[0].encode()))
    assert meta.message_type == "train" and meta.group_id == "1" and meta.message_id == ""
    assert meta.run_id == zlib.crc32(b"run-1")
    assert message.content["config"]["server-round"] == 1
    arrays = message.content["arrays"]
    assert list(arrays) == ["w", "b"]
    np.testing.assert_array_equal(arrays["w"].numpy(), MODEL["w"])
    assert setup.state.lookup(TASK) is not None
    # No temp file is left where the owner's watcher looks.
    assert [p.name for p in setup.target.messages_dir(OWNERS[0]).iterdir()] == [
        f"{uuid.UUID(hex=TASK)}.request"
    ]


def test_a_request_is_written_once_even_when_dispatched_again(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK})
    path = setup.target.request_path(OWNERS[0], request_id_for_task(TASK))
    first = path.stat().st_mtime_ns, path.read_bytes()
    setup.dispatch({OWNERS[0]: TASK})  # a restart re-dispatches the open round
    assert (path.stat().st_mtime_ns, path.read_bytes()) == first


def test_a_trained_reply_becomes_a_native_result(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK})
    body = client_reply(setup.request(OWNERS[0]), adding(0.5, 7))
    with structlog.testing.capture_logs() as logs:
        outcome = setup.translate(setup.respond(OWNERS[0], body), OWNERS[0])
    assert isinstance(outcome, Translated) and outcome.ok and outcome.message.envelope.round == 1
    assert [(e["event"], e["metrics"]) for e in logs] == [("syft_flwr.metrics_dropped", ["hist"])]
    result = setup.native(outcome)
    assert result.ok and result.num_examples == 7 and result.envelope.reply_to == TASK
    assert result.metrics == {"loss": 0.25}  # the list metric is dropped: native metrics are scalars
    np.testing.assert_array_equal(result.arrays["w"], MODEL["w"] + 0.5)
    np.testing.assert_array_equal(result.arrays["b"], MODEL["b"] + 0.5)
    # Forgotten once the round loop decided, not by the translator.
    assert setup.state.lookup(TASK) is not None


def test_an_evaluation_reply_carries_metrics_only(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK}, action="evaluate")
    assert bytes_to_flower_message(setup.request(OWNERS[0]).body).metadata.message_type == "evaluate"
    body = client_reply(setup.request(OWNERS[0]), adding(0.0, 9))
    outcome = setup.translate(setup.respond(OWNERS[0], body), OWNERS[0])
    assert isinstance(outcome, Translated)
    result = setup.native(outcome)
    assert result.action == "evaluate" and result.num_examples == 9 and result.metrics == {"accuracy": 0.5}


def test_a_raising_client_app_is_a_counted_failure(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK})
    body = client_reply(setup.request(OWNERS[0]), adding(0.0, 1, fail=True))
    outcome = setup.translate(setup.respond(OWNERS[0], body), OWNERS[0])
    assert isinstance(outcome, Translated) and not outcome.ok
    result = setup.native(outcome)
    assert not result.ok and result.error_type == "ClientAppException"
    assert result.error_message is not None and "disk full" in result.error_message
    assert len(result.error_message) <= 1100


def test_a_syft_rpc_error_status_is_a_counted_failure(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK})
    path = setup.respond(OWNERS[0], b"Invalid request schema: missing field", status=400)
    outcome = setup.translate(path, OWNERS[0])
    assert isinstance(outcome, Translated) and not outcome.ok
    result = setup.native(outcome)
    assert result.error_type == "SyftRpcStatus400" and "Invalid request schema" in (
        result.error_message or ""
    )


def test_a_request_the_owner_read_half_downloaded_is_torn_not_failed(tmp_path: Path) -> None:
    # syft-event answers 400 "Error loading request" before any handler runs.
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK})
    body = b"Error loading request: ValidationError('Invalid JSON: EOF while parsing a value')"
    outcome = setup.translate(setup.respond(OWNERS[0], body, status=400), OWNERS[0])
    assert isinstance(outcome, TornRequest) and outcome.task_id == TASK and not outcome.stop


def test_an_encrypted_reply_fails_the_owner_with_the_fix(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK})
    payload = {
        "ek": "AA==",
        "iv": "AA==",
        "ciphertext": "AA==",
        "tag": "AA==",
        "sender": OWNERS[0],
        "receiver": AGG,
    }
    outcome = setup.translate(setup.respond(OWNERS[0], json.dumps(payload).encode()), OWNERS[0])
    assert isinstance(outcome, Translated) and not outcome.ok
    result = setup.native(outcome)
    assert result.error_type == "EncryptedReply" and result.error_message == ENCRYPTION_HINT
    assert "encryption = false: set it to true" in ENCRYPTION_HINT


def test_a_reply_being_written_is_not_yet(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK})
    body = client_reply(setup.request(OWNERS[0]), adding(0.5, 7))
    path = setup.respond(OWNERS[0], body)
    whole = path.read_bytes()
    for cut in (0, 10, len(whole) // 2, len(whole) - 1):
        path.write_bytes(whole[:cut])
        assert isinstance(setup.translate(path, OWNERS[0]), NotYet), cut
    path.write_bytes(whole)
    assert isinstance(setup.translate(path, OWNERS[0]), Translated)


def test_replies_in_the_wrong_folder_or_for_another_id_are_refused(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK})
    body = client_reply(setup.request(OWNERS[0]), adding(0.5, 7))
    forged = setup.translate(setup.respond(OWNERS[0], body, sender=OWNERS[1]), OWNERS[0])
    assert isinstance(forged, Unusable) and forged.reason == Reason.BAD_FIELD and forged.failure is None
    other = "f" * 32
    renamed = setup.respond(OWNERS[0], body)
    outcome = setup.translate(renamed, OWNERS[0], task=other)
    assert isinstance(outcome, Unusable) and outcome.reason == Reason.REPLY_TO_MISMATCH


def test_a_reply_from_another_node_id_is_refused(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK, OWNERS[1]: "e" * 32})
    body = client_reply(setup.request(OWNERS[1], "e" * 32), adding(0.5, 7))
    # do2's answer (src_node_id = crc32(do2)) dropped into do1's folder under do1's request id.
    outcome = setup.translate(setup.respond(OWNERS[0], body), OWNERS[0])
    assert isinstance(outcome, Unusable) and outcome.reason == Reason.BAD_FIELD


def test_a_wrong_number_of_arrays_is_a_failure_and_quarantined(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK})
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"].to_numpy_ndarrays()[:1]
        metrics = MetricRecord({"num-examples": 3})
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)

    body = client_reply(setup.request(OWNERS[0]), app)
    outcome = setup.translate(setup.respond(OWNERS[0], body), OWNERS[0])
    assert isinstance(outcome, Unusable) and outcome.reason == Reason.MALFORMED
    assert outcome.failure is not None and not outcome.failure.ok
    assert "1 arrays in the reply; the model has 2" in outcome.detail


def test_a_reply_without_num_examples_is_a_failure(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK})
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = ArrayRecord(msg.content["arrays"].to_numpy_ndarrays())
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"loss": 1.0})}), reply_to=msg)

    body = client_reply(setup.request(OWNERS[0]), app)
    outcome = setup.translate(setup.respond(OWNERS[0], body), OWNERS[0])
    assert isinstance(outcome, Unusable) and outcome.failure is not None
    assert "num-examples" in outcome.detail


def test_garbage_bodies_and_unknown_requests(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK})
    outcome = setup.translate(setup.respond(OWNERS[0], b"\x00not protobuf\xff" * 3), OWNERS[0])
    assert isinstance(outcome, Unusable) and outcome.failure is not None
    unknown = "d" * 32
    outcome = setup.translate(
        setup.respond(OWNERS[0], b"x", task=unknown, status=500), OWNERS[0], task=unknown
    )
    assert isinstance(outcome, Unusable) and outcome.reason == Reason.NOT_SELECTED


def test_the_stop_message_stops_a_syft_flwr_owner(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    assert setup.publisher.send_stop(OWNERS, "never started") == []  # no folder is created for them
    assert not setup.target.datasites_dir.exists()
    for owner in OWNERS:
        setup.target.rpc_dir(owner).mkdir(parents=True)  # what an owner's start-up does
    assert setup.publisher.send_stop(OWNERS, "job complete") == list(OWNERS)
    assert setup.publisher.send_stop(OWNERS, "again") == []  # written once
    (stop_task,) = [t for t, o in setup.state.stop_requests.items() if o == OWNERS[0]]
    request = setup.request(OWNERS[0], stop_task)
    message = bytes_to_flower_message(request.body)
    assert message.metadata.message_type == "system" and message.metadata.group_id == "final"
    stopped = []

    class Events:
        def stop(self) -> None:
            stopped.append(True)

    handler = MessageHandler(adding(0, 1), Context(1, 2, {}, RecordDict(), {}), encryption_enabled=False)
    assert RequestProcessor(handler, Events(), "o").process(request.body) is None  # type: ignore[arg-type]
    assert stopped == [True]
    ack = setup.respond(OWNERS[0], None, task=stop_task)
    assert isinstance(setup.translate(ack, OWNERS[0], stop_task), StopAcknowledged)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda a: a.astype(np.float64), Reason.DTYPE_MISMATCH),
        (lambda a: a.astype(np.complex64), Reason.DTYPE_MISMATCH),
        (lambda a: a.reshape(-1), Reason.SHAPE_MISMATCH),
        (lambda a: np.full_like(a, np.nan), Reason.NON_FINITE),
    ],
    ids=["float64", "complex", "flattened", "nan"],
)
def test_arrays_the_model_cannot_take_are_a_counted_failure(
    tmp_path: Path, make: object, reason: Reason
) -> None:
    # Refused only by the intake, the owner would be neither counted nor asked again.
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK})
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = [make(a) for a in msg.content["arrays"].to_numpy_ndarrays()]  # type: ignore[operator]
        metrics = MetricRecord({"num-examples": 3})
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)

    body = client_reply(setup.request(OWNERS[0]), app)
    inbound = setup.read(setup.respond(OWNERS[0], body), OWNERS[0])
    assert isinstance(inbound, Inbound) and inbound.refusal is not None, inbound
    assert inbound.refusal[0] == reason, inbound.refusal
    assert isinstance(inbound.message, ResultMessage) and not inbound.message.ok
    assert inbound.message.error_type == "InvalidReply" and inbound.message.envelope.reply_to == TASK


def test_an_answer_to_another_owners_request_is_refused(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK})
    body = client_reply(setup.request(OWNERS[0]), adding(0.5, 7))
    # Copied into do2's folder under do1's request id, with do2 as sender.
    request_id = request_id_for_task(TASK)
    response = SyftResponse(
        id=request_id, sender=OWNERS[1], url=SyftBoxURL(setup.target.url(OWNERS[1])), body=body
    )
    path = setup.target.response_path(OWNERS[1], request_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    response.dump(path)
    outcome = setup.translate(path, OWNERS[1])
    assert isinstance(outcome, Unusable) and outcome.reason == Reason.NOT_SELECTED
    assert setup.state.lookup(TASK) is not None  # do1's request is still open


def test_a_translator_bug_costs_one_file_not_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = Setup(tmp_path)
    setup.dispatch({OWNERS[0]: TASK})
    body = client_reply(setup.request(OWNERS[0]), adding(0.5, 7))

    def broken(*args: object, **kwargs: object) -> object:
        raise KeyError("bug")

    monkeypatch.setattr(setup.translator, "_from_reply", broken)
    outcome = setup.translate(setup.respond(OWNERS[0], body), OWNERS[0])
    assert isinstance(outcome, Unusable) and outcome.reason == Reason.INTERNAL_ERROR


def test_a_restart_does_not_ask_again_an_owner_whose_answer_waits(tmp_path: Path) -> None:
    # Answers already counted are left out by the daemon's re-dispatch (daemon/startup.py);
    # an answer not yet read keeps its request from being written again.
    setup = Setup(tmp_path)
    other = "e" * 32
    setup.dispatch({OWNERS[0]: TASK, OWNERS[1]: other})
    body = client_reply(setup.request(OWNERS[0]), adding(0.5, 7))
    response = setup.respond(OWNERS[0], body)
    request = response.with_suffix(".request")
    request.unlink()  # the owner's sync client may have dropped it
    restarted = Setup(tmp_path)  # a new process: nothing in memory
    restarted.dispatch({OWNERS[0]: TASK, OWNERS[1]: other})  # the open round, re-dispatched
    assert not request.exists()
    assert restarted.state.lookup(TASK) is not None  # its answer is counted when read
    assert isinstance(restarted.translate(response, OWNERS[0]), Translated)


def test_a_reply_over_the_size_limit_is_a_counted_failure(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.translator.max_file_bytes = 200
    setup.dispatch({OWNERS[0]: TASK})
    body = client_reply(setup.request(OWNERS[0]), adding(0.5, 7))
    outcome = setup.translate(setup.respond(OWNERS[0], body), OWNERS[0])
    assert isinstance(outcome, Unusable) and outcome.reason == Reason.FILE_TOO_LARGE
    assert outcome.failure is not None
    result = setup.native(outcome.failure)
    assert result.error_type == "ReplyTooLarge" and "max_file_bytes" in (result.error_message or "")


def test_no_request_is_written_through_a_symlink_in_an_owners_folder(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    rpc = setup.target.rpc_dir(OWNERS[0])
    (rpc / "messages").mkdir(parents=True)
    (rpc / "messages" / AGG).symlink_to(outside)
    setup.dispatch({OWNERS[0]: TASK})
    assert list(outside.iterdir()) == []
