"""The bridge's handling of files as they arrive (runs in the syft-flwr environment)."""

from __future__ import annotations

import time
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

from fl_orchestrator.intake.quarantine import Quarantine
from fl_orchestrator.protocols.syft_flwr.bridge import Bridge
from fl_orchestrator.protocols.syft_flwr.layout import (
    MAX_RESENDS,
    SyftFlwrLayout,
    request_id_for_task,
    resend_ids,
)
from fl_orchestrator.protocols.syft_flwr.publisher import SyftFlwrPublisher
from fl_orchestrator.protocols.syft_flwr.replies import ReplyTranslator, SyftFlwrState
from fl_orchestrator.wire.layout import JobLayout

pytestmark = pytest.mark.anyio

AGG = "agg@example.org"
OWNER = "do1@example.org"
TASK = "0123456789abcdef0123456789abcdef"
MODEL = {"w": np.ones((2, 2), dtype=np.float32)}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_bridge(tmp: Path, settle: float = 0.2) -> Bridge:
    target = SyftFlwrLayout(tmp / "box", "app_1", AGG)
    spool = JobLayout(tmp / "spool", "job", AGG)
    state = SyftFlwrState()
    publisher = SyftFlwrPublisher(
        spool, (OWNER,), target=target, state=state, run_id="run", expiry_margin_seconds=60
    )
    return Bridge(
        target=target,
        spool=spool,
        owners=(OWNER,),
        state=state,
        publisher=publisher,
        translator=ReplyTranslator(target, spool, state, max_file_bytes=1 << 20),
        quarantine=Quarantine(tmp / "quarantine", flag_after=5, keep_originals=False),
        settle_seconds=settle,
        heartbeat_interval_seconds=0.05,
        rescan_interval_seconds=60,
        debounce_milliseconds=5,
    )


def dispatch(bridge: Bridge, deadline: float = 4e9) -> Path:
    broadcast = bridge.publisher.write_model(1, MODEL)
    bridge.publisher.write_tasks(
        broadcast, {OWNER: TASK}, attempt=1, deadline=deadline, config={"server-round": 1}, rnd=1
    )
    return bridge.target.request_path(OWNER, request_id_for_task(TASK))


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


def publish_schema(bridge: Bridge) -> Path:
    schema = bridge.target.schema_path(OWNER)
    schema.parent.mkdir(parents=True, exist_ok=True)
    schema.write_text("{}")
    return schema


async def test_presence_writes_a_spool_heartbeat(tmp_path: Path) -> None:
    bridge = make_bridge(tmp_path)
    await bridge.look_at([publish_schema(bridge)])
    assert bridge.present == {OWNER}
    assert bridge.spool.heartbeat_path(OWNER).is_file()


async def test_a_reply_written_in_two_steps_is_read_once_complete(tmp_path: Path) -> None:
    bridge = make_bridge(tmp_path)
    request = dispatch(bridge)
    response = request.with_suffix(".response")
    whole = answer(request)
    response.write_bytes(b"")  # syft-rpc creates the file, then fills it
    await bridge.look_at([response])
    assert response in bridge.unsettled and not bridge.spool.result_path(OWNER, TASK).exists()
    response.write_bytes(whole)
    await bridge.look_at([response])
    assert bridge.spool.result_path(OWNER, TASK).is_file()
    assert not request.exists() and not response.exists()
    assert bridge.state.lookup(TASK) is None and bridge.answered == 1
    assert not list((tmp_path / "quarantine").rglob("*.response"))


async def test_a_reply_that_stays_torn_is_quarantined_after_the_settle_time(tmp_path: Path) -> None:
    bridge = make_bridge(tmp_path, settle=0.1)
    request = dispatch(bridge)
    response = request.with_suffix(".response")
    response.write_bytes(answer(request)[:50])
    await bridge.look_at([response])
    assert response.exists()
    await anyio.sleep(0.15)
    await bridge.look_at([response])
    assert not response.exists()
    (kept,) = (tmp_path / "quarantine").rglob("*.response")
    assert kept.name.endswith(f"-truncated-{response.name}")
    assert not bridge.spool.result_path(OWNER, TASK).exists()


async def test_the_running_bridge_sees_replies_by_event(tmp_path: Path) -> None:
    bridge = make_bridge(tmp_path)
    publish_schema(bridge)
    request = dispatch(bridge)
    async with anyio.create_task_group() as group:
        group.start_soon(bridge.run)
        with anyio.fail_after(5):
            while bridge.present != {OWNER}:
                await anyio.sleep(0.01)
            started = time.monotonic()
            request.with_suffix(".response").write_bytes(answer(request))
            while not bridge.spool.result_path(OWNER, TASK).exists():
                await anyio.sleep(0.005)
        latency = time.monotonic() - started
        group.cancel_scope.cancel()
    assert latency < 2.0, "found by the watcher, not by the 60 s rescan"


async def test_an_owner_that_misses_a_deadline_is_no_longer_marked_present(tmp_path: Path) -> None:
    bridge = make_bridge(tmp_path)
    await bridge.look_at([publish_schema(bridge)])
    dispatch(bridge, deadline=time.time() - 1)
    heartbeat = bridge.spool.heartbeat_path(OWNER)
    heartbeat.unlink()
    async with anyio.create_task_group() as group:
        group.start_soon(bridge._heartbeat_forever)
        await anyio.sleep(0.2)  # four heartbeat intervals
        group.cancel_scope.cancel()
    assert bridge.state.overdue_owners(time.time()) == {OWNER}
    assert not heartbeat.exists()
    await bridge.look_at([bridge.target.schema_path(OWNER)])  # a rescan finds the schema again
    assert not heartbeat.exists()


async def test_finish_sends_stop_and_waits_for_the_answer(tmp_path: Path) -> None:
    bridge = make_bridge(tmp_path)
    publish_schema(bridge)

    async def owner_answers() -> None:
        messages = bridge.target.messages_dir(OWNER)
        while not list(messages.glob("*.request")):
            await anyio.sleep(0.01)
        (request,) = messages.glob("*.request")
        parsed = SyftRequest.load(request)
        ack = SyftResponse(id=parsed.id, sender=OWNER, url=SyftBoxURL(str(parsed.url)), body=None)
        request.with_suffix(".response").write_text(ack.model_dump_json())

    async with anyio.create_task_group() as group:
        group.start_soon(bridge.run)
        group.start_soon(owner_answers)
        with anyio.fail_after(5):
            await bridge.finish("job complete", wait_seconds=4)
        group.cancel_scope.cancel()
    assert bridge.stop_pending == set()
    assert not list(bridge.target.messages_dir(OWNER).iterdir())


async def test_the_same_reply_named_by_two_watchers_at_once_is_translated_once(tmp_path: Path) -> None:
    bridge = make_bridge(tmp_path)
    request = dispatch(bridge)
    response = request.with_suffix(".response")
    response.write_bytes(answer(request))
    async with anyio.create_task_group() as group:
        for _ in range(4):  # the watcher, the retry and the rescan may all name it
            group.start_soon(bridge.look_at, [response])
    assert bridge.answered == 1
    assert bridge.spool.result_path(OWNER, TASK).is_file()


async def test_a_stop_answered_with_an_error_is_not_reported_as_stopped(tmp_path: Path) -> None:
    bridge = make_bridge(tmp_path)
    publish_schema(bridge)

    async def owner_refuses() -> None:
        messages = bridge.target.messages_dir(OWNER)
        while not list(messages.glob("*.request")):
            await anyio.sleep(0.01)
        (request,) = messages.glob("*.request")
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
        async with anyio.create_task_group() as group:
            group.start_soon(bridge.run)
            group.start_soon(owner_refuses)
            with anyio.fail_after(5):
                await bridge.finish("job complete", wait_seconds=4)
            group.cancel_scope.cancel()
    assert bridge.stop_pending == set()  # answered, so not waited for again
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
    bridge = make_bridge(tmp_path)
    first = dispatch(bridge)
    await bridge.look_at([respond_raw(first, TORN, 400)])
    assert not first.exists() and not first.with_suffix(".response").exists()
    (second,) = bridge.target.messages_dir(OWNER).glob("*.request")
    assert second.name == f"{resend_ids(TASK)[0]}.request"
    assert bridge.state.lookup(TASK) is not None  # still waited for
    await bridge.look_at([second.with_suffix(".response")])  # nothing there yet: no-op
    second.with_suffix(".response").write_bytes(answer(second))
    await bridge.look_at([second.with_suffix(".response")])
    assert bridge.spool.result_path(OWNER, TASK).is_file()  # counted under the task's own id
    assert bridge.state.lookup(TASK) is None


async def test_after_the_last_resend_a_torn_read_is_a_counted_failure(tmp_path: Path) -> None:
    bridge = make_bridge(tmp_path)
    request = dispatch(bridge)
    for _ in range(MAX_RESENDS + 1):
        await bridge.look_at([respond_raw(request, TORN, 400)])
        remaining = list(bridge.target.messages_dir(OWNER).glob("*.request"))
        if not remaining:
            break
        (request,) = remaining
    assert bridge.state.resends[TASK] == MAX_RESENDS
    assert bridge.spool.result_path(OWNER, TASK).is_file()
    assert bridge.state.lookup(TASK) is None


async def test_a_refused_upload_fails_the_owner_at_once(tmp_path: Path) -> None:
    bridge = make_bridge(tmp_path)
    request = dispatch(bridge)
    rejected = request.with_name(request.name.replace(".request", ".syftrejected.request"))
    request.rename(rejected)  # what the aggregator's SyftBox client does on a 403
    with structlog.testing.capture_logs() as logs:
        await bridge.look_at([rejected])
        await bridge.look_at([rejected])  # a rescan: once only
    assert [e["event"] for e in logs] == ["syft_flwr.upload_refused"]
    assert "syftperm.yaml" in logs[0]["hint"]
    assert bridge.spool.result_path(OWNER, TASK).is_file()
    assert bridge.state.lookup(TASK) is None


async def test_a_stop_message_read_half_downloaded_is_sent_again(tmp_path: Path) -> None:
    bridge = make_bridge(tmp_path)
    publish_schema(bridge)
    answered: list[str] = []

    async def owner() -> None:
        messages = bridge.target.messages_dir(OWNER)
        for status, body in ((400, TORN), (200, None)):
            while not list(messages.glob("*.request")) or list(messages.glob("*.response")):
                await anyio.sleep(0.01)
            (request,) = messages.glob("*.request")
            answered.append(request.name)
            respond_raw(request, body, status)

    async with anyio.create_task_group() as group:
        group.start_soon(bridge.run)
        group.start_soon(owner)
        with anyio.fail_after(5):
            await bridge.finish("job complete", wait_seconds=4)
        group.cancel_scope.cancel()
    assert bridge.stop_pending == set()
    assert len(answered) == 2 and answered[0] != answered[1]


async def test_owners_never_seen_are_named_with_what_to_check(tmp_path: Path) -> None:
    bridge = make_bridge(tmp_path)
    with structlog.testing.capture_logs() as logs:
        await bridge.finish("only 0 of 1 needed datasites were seen", wait_seconds=0)
    (entry,) = [e for e in logs if e["event"] == "syft_flwr.owners_never_seen"]
    assert entry["owners"] == [OWNER] and "syftperm.yaml" in entry["hint"]
