"""The syft-flwr adapter behind the one intake, as files arrive (runs in the syft-flwr environment).

Each test drives the shared intake loop (intake/loop.py) over the syft-flwr
adapter (protocols/syft_flwr/wire.py); ``Scene.decide`` stands for the round
loop: it keeps a counted result and tells the adapter it was decided.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import numpy as np
import pytest
import structlog.testing

pytest.importorskip("syft_flwr")

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from syft_core.url import SyftBoxURL
from syft_flwr.fl_orchestrator.flower_client import MessageHandler, RequestProcessor
from syft_rpc.protocol import SyftRequest, SyftResponse

from fl_orchestrator.config.schema import LimitsSection
from fl_orchestrator.core import events as ev
from fl_orchestrator.intake.loop import IntakeLoop
from fl_orchestrator.intake.quarantine import Quarantine
from fl_orchestrator.intake.reader import InboundReader, ResultHandle
from fl_orchestrator.intake.watcher import PathBatch, watch_job_files
from fl_orchestrator.protocols.syft_flwr.layout import (
    MAX_RESENDS,
    SyftFlwrLayout,
    request_id_for_task,
    resend_ids,
)
from fl_orchestrator.protocols.syft_flwr.publisher import SyftFlwrPublisher
from fl_orchestrator.protocols.syft_flwr.replies import ReplyTranslator, SyftFlwrState
from fl_orchestrator.protocols.syft_flwr.wire import SyftFlwrWire
from fl_orchestrator.storage.kept import KeptResults
from fl_orchestrator.wire.layout import JobLayout
from fl_orchestrator.wire.messages import model_spec

pytestmark = pytest.mark.anyio

AGG = "agg@example.org"
OWNER = "do1@example.org"
TASK = "0123456789abcdef0123456789abcdef"
MODEL = {"w": np.ones((2, 2), dtype=np.float32)}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Scene:
    """The adapter, the shared intake loop over it, and what the round loop would do."""

    def __init__(self, tmp: Path, settle: float = 0.2) -> None:
        self.target = SyftFlwrLayout(tmp / "box", "app_1", AGG)
        state = SyftFlwrState()
        self.publisher = SyftFlwrPublisher(
            (OWNER,), target=self.target, state=state, run_id="run", expiry_margin_seconds=60
        )
        translator = ReplyTranslator(self.target, "job", state, max_file_bytes=1 << 20)
        self.wire = SyftFlwrWire(self.target, (OWNER,), state, self.publisher, translator)
        self.state = state
        layout = JobLayout(tmp / "box", "job", AGG)
        reader = InboundReader(layout, frozenset({OWNER}), model_spec(MODEL), LimitsSection())
        self.quarantine = tmp / "quarantine"
        self.intake = IntakeLoop(
            self.wire, reader, Quarantine(self.quarantine, keep_originals=False), time.time, settle
        )
        self.kept = KeptResults(tmp / "state", self.target.datasites_dir)
        self.events: list[ev.Event] = []

    async def look_at(self, paths: list[Path]) -> list[ev.Event]:
        """Take each path; decide each result as the round loop would (count it, keep it)."""
        found: list[ev.Event] = []
        for path in paths:
            for event in await self.intake.take(path):
                found.append(event)
                if isinstance(event, ev.ResultReceived):
                    self.decide(event)
        self.events.extend(found)
        return found

    def decide(self, event: ev.ResultReceived) -> None:
        handle: ResultHandle = event.payload
        if event.ok and event.purpose == "train":
            assert self.wire.keep(self.kept, 1, handle)
        self.wire.decided(handle)

    def results(self) -> list[ev.ResultReceived]:
        return [e for e in self.events if isinstance(e, ev.ResultReceived)]

    async def run(self, send_events: anyio.abc.ObjectSendStream[ev.Event]) -> None:
        """The watcher and the intake loop, as the daemon runs them."""
        batches_send, batches_recv = anyio.create_memory_object_stream[PathBatch](16)
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: watch_job_files(
                    self.wire, (OWNER,), batches_send, debounce_milliseconds=5, rescan_interval_seconds=60
                )
            )
            group.start_soon(self.intake.run, batches_recv, send_events)


def dispatch(scene: Scene, deadline: float = 4e9) -> Path:
    broadcast = scene.publisher.write_model(1, MODEL)
    scene.publisher.write_tasks(
        broadcast, {OWNER: TASK}, attempt=1, deadline=deadline, config={"server-round": 1}, rnd=1
    )
    return scene.target.request_path(OWNER, request_id_for_task(TASK))


def answer(request_path: Path) -> bytes:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = ArrayRecord(msg.content["arrays"].to_numpy_ndarrays())
        return Message(
            RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 4})}), reply_to=msg
        )

    request = SyftRequest.load(request_path)
    handler = MessageHandler(app, Context(1, 2, {}, RecordDict(), {}), encryption_enabled=False)
    body = RequestProcessor(handler, None, OWNER).process(request.body)  # type: ignore[arg-type]
    assert isinstance(body, bytes)
    response = SyftResponse(id=request.id, sender=OWNER, url=request.url, body=body)
    return response.model_dump_json().encode()


def publish_schema(scene: Scene) -> Path:
    schema = scene.target.schema_path(OWNER)
    schema.parent.mkdir(parents=True, exist_ok=True)
    schema.write_text("{}")
    return schema


async def test_presence_is_the_schema_seen_as_a_node(tmp_path: Path) -> None:
    scene = Scene(tmp_path)
    (seen,) = await scene.look_at([publish_schema(scene)])
    assert isinstance(seen, ev.NodeSeen) and seen.datasite == OWNER
    assert scene.wire.present == {OWNER}
    assert await scene.look_at([scene.target.schema_path(OWNER)]) == []  # unchanged: seen once


async def test_a_reply_written_in_two_steps_is_read_once_complete(tmp_path: Path) -> None:
    scene = Scene(tmp_path)
    request = dispatch(scene)
    response = request.with_suffix(".response")
    whole = answer(request)
    response.write_bytes(b"")  # syft-rpc creates the file, then fills it
    assert await scene.look_at([response]) == []
    assert response in scene.intake.unsettled
    response.write_bytes(whole)
    alive, result = await scene.look_at([response])
    assert isinstance(alive, ev.NodeSeen) and alive.datasite == OWNER  # it answered: it is up
    assert isinstance(result, ev.ResultReceived) and result.ok and result.reply_to == TASK
    assert result.num_examples == 4 and result.payload.message.arrays["w"].shape == (2, 2)
    assert not request.exists() and not response.exists()  # decided: the pair is gone
    assert scene.state.lookup(TASK) is None
    assert scene.kept.path_for(1, response).is_file()  # the native copy a restart reads
    assert not list(scene.quarantine.rglob("*.response"))


async def test_a_reply_that_stays_torn_is_quarantined_after_the_settle_time(tmp_path: Path) -> None:
    scene = Scene(tmp_path, settle=0.1)
    request = dispatch(scene)
    response = request.with_suffix(".response")
    response.write_bytes(answer(request)[:50])
    assert await scene.look_at([response]) == []
    assert response.exists()
    await anyio.sleep(0.15)
    assert await scene.look_at([response]) == []
    assert not response.exists()
    (kept,) = scene.quarantine.rglob("*.response")
    assert kept.name.endswith(f"-truncated-{response.name}")
    assert scene.results() == []


async def test_the_running_intake_sees_replies_by_event(tmp_path: Path) -> None:
    scene = Scene(tmp_path)
    publish_schema(scene)
    request = dispatch(scene)
    send, receive = anyio.create_memory_object_stream[ev.Event](16)
    async with anyio.create_task_group() as group:
        group.start_soon(scene.run, send)
        with anyio.fail_after(5):
            assert isinstance(await receive.receive(), ev.NodeSeen)  # the start-up scan
            await anyio.sleep(0.2)  # the watch is set up
            started = time.monotonic()
            request.with_suffix(".response").write_bytes(answer(request))
            while not isinstance(event := await receive.receive(), ev.ResultReceived):
                pass
        latency = time.monotonic() - started
        group.cancel_scope.cancel()
    assert event.ok and event.reply_to == TASK
    assert latency < 2.0, "found by the watcher, not by the 60 s rescan"


async def finish_while(scene: Scene, owner: Callable[[], Awaitable[None]]) -> None:
    """Run the intake and an owner while the adapter sends the stop and waits for the answer."""
    send, _receive = anyio.create_memory_object_stream[ev.Event](16)
    async with anyio.create_task_group() as group:
        group.start_soon(scene.run, send)
        group.start_soon(owner)
        with anyio.fail_after(5):
            await scene.wire.finish("job complete", wait_seconds=4)
        group.cancel_scope.cancel()


async def next_request(scene: Scene) -> Path:
    """The one request in the owner's folder, once there is one (and no response yet)."""
    messages = scene.target.messages_dir(OWNER)
    while not list(messages.glob("*.request")) or list(messages.glob("*.response")):
        await anyio.sleep(0.01)
    (request,) = messages.glob("*.request")
    return request


async def test_finish_sends_stop_and_waits_for_the_answer(tmp_path: Path) -> None:
    scene = Scene(tmp_path)
    publish_schema(scene)

    async def owner_answers() -> None:
        request = await next_request(scene)
        parsed = SyftRequest.load(request)
        ack = SyftResponse(id=parsed.id, sender=OWNER, url=SyftBoxURL(str(parsed.url)), body=None)
        request.with_suffix(".response").write_text(ack.model_dump_json())

    await finish_while(scene, owner_answers)
    assert scene.wire.stop_pending == set()
    assert not list(scene.target.messages_dir(OWNER).iterdir())


async def test_a_reply_named_by_the_watcher_and_the_rescan_is_counted_once(tmp_path: Path) -> None:
    # One intake task takes every path in turn, so "at once" cannot happen; twice can.
    scene = Scene(tmp_path)
    request = dispatch(scene)
    response = request.with_suffix(".response")
    response.write_bytes(answer(request))
    scene.intake.quarantine.keep_originals = True  # copy mode: the pair would stay if refused
    await scene.look_at([response, response])
    await scene.look_at([response])
    assert len(scene.results()) == 1


async def test_a_stop_answered_with_an_error_is_not_reported_as_stopped(tmp_path: Path) -> None:
    scene = Scene(tmp_path)
    publish_schema(scene)

    async def owner_refuses() -> None:
        request = await next_request(scene)
        parsed = SyftRequest.load(request)
        refusal = SyftResponse(
            id=parsed.id,
            sender=OWNER,
            url=SyftBoxURL(str(parsed.url)),
            body=b"Request expired",
            status_code=419,
        )
        request.with_suffix(".response").write_text(refusal.model_dump_json())

    with structlog.testing.capture_logs() as logs:
        await finish_while(scene, owner_refuses)
    assert scene.wire.stop_pending == set()  # answered, so not waited for again
    events = [entry["event"] for entry in logs]
    assert "syft_flwr.stop_refused" in events and "syft_flwr.stopped" not in events
    (refused,) = [entry for entry in logs if entry["event"] == "syft_flwr.stop_refused"]
    assert refused["status"] == 419


TORN = b"Error loading request: ValidationError('Invalid JSON: EOF while parsing a value at line 1 column 0')"


def respond_raw(request_path: Path, body: bytes | None, status: int) -> Path:
    parsed = SyftRequest.load(request_path)
    response = SyftResponse(id=parsed.id, sender=OWNER, url=parsed.url, body=body, status_code=status)
    path = request_path.with_suffix(".response")
    path.write_text(response.model_dump_json())
    return path


async def test_a_request_read_half_downloaded_is_sent_again_under_a_new_name(tmp_path: Path) -> None:
    scene = Scene(tmp_path)
    first = dispatch(scene)
    assert await scene.look_at([respond_raw(first, TORN, 400)]) == []
    assert not first.exists() and not first.with_suffix(".response").exists()
    (second,) = scene.target.messages_dir(OWNER).glob("*.request")
    assert second.name == f"{resend_ids(TASK)[0]}.request"
    assert scene.state.lookup(TASK) is not None  # still waited for
    assert await scene.look_at([second.with_suffix(".response")]) == []  # nothing there yet
    second.with_suffix(".response").write_bytes(answer(second))
    _, result = await scene.look_at([second.with_suffix(".response")])
    assert isinstance(result, ev.ResultReceived) and result.ok
    assert result.reply_to == TASK  # counted under the task's own id
    assert scene.state.lookup(TASK) is None


async def test_after_the_last_resend_a_torn_read_is_a_counted_failure(tmp_path: Path) -> None:
    scene = Scene(tmp_path)
    request = dispatch(scene)
    for _ in range(MAX_RESENDS + 1):
        await scene.look_at([respond_raw(request, TORN, 400)])
        remaining = list(scene.target.messages_dir(OWNER).glob("*.request"))
        if not remaining:
            break
        (request,) = remaining
    assert scene.state.resends[TASK] == MAX_RESENDS
    (failure,) = scene.results()
    assert not failure.ok and failure.reply_to == TASK and failure.error_type == "SyftRpcStatus400"
    assert scene.state.lookup(TASK) is None


async def test_a_refused_upload_fails_the_owner_at_once(tmp_path: Path) -> None:
    scene = Scene(tmp_path)
    request = dispatch(scene)
    rejected = request.with_name(request.name.replace(".request", ".syftrejected.request"))
    request.rename(rejected)  # what the aggregator's SyftBox client does on a 403
    with structlog.testing.capture_logs() as logs:
        await scene.look_at([rejected])
        await scene.look_at([rejected])  # a rescan: once only
    assert [e["event"] for e in logs] == ["syft_flwr.upload_refused"]
    assert "syftperm.yaml" in logs[0]["hint"]
    (failure,) = scene.results()
    assert not failure.ok and failure.error_type == "SyncRefused" and failure.reply_to == TASK


async def test_a_stop_message_read_half_downloaded_is_sent_again(tmp_path: Path) -> None:
    scene = Scene(tmp_path)
    publish_schema(scene)
    answered: list[str] = []

    async def owner() -> None:
        for status, body in ((400, TORN), (200, None)):
            request = await next_request(scene)
            answered.append(request.name)
            respond_raw(request, body, status)

    await finish_while(scene, owner)
    assert scene.wire.stop_pending == set()
    assert len(answered) == 2 and answered[0] != answered[1]


async def test_owners_never_seen_are_named_with_what_to_check(tmp_path: Path) -> None:
    scene = Scene(tmp_path)
    with structlog.testing.capture_logs() as logs:
        await scene.wire.finish("only 0 of 1 needed datasites were seen", wait_seconds=0)
    (entry,) = [e for e in logs if e["event"] == "syft_flwr.owners_never_seen"]
    assert entry["owners"] == [OWNER] and "syftperm.yaml" in entry["hint"]


async def test_a_reply_whose_arrays_do_not_fit_is_a_counted_failure_and_quarantined(tmp_path: Path) -> None:
    # The shared validator refuses it; the owner will not answer again, so it counts as failed.
    scene = Scene(tmp_path)
    request = dispatch(scene)
    scene.intake.reader.set_global_model({"w": np.ones((3, 3), dtype=np.float32)})
    response = request.with_suffix(".response")
    response.write_bytes(answer(request))
    await scene.look_at([response])
    (failure,) = scene.results()
    assert not failure.ok and failure.error_type == "InvalidReply"
    (quarantined,) = scene.quarantine.rglob("*.response")
    assert "-shape_mismatch-" in quarantined.name
