"""A result that is still being written in place is waited for, not refused."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import numpy as np

from fl_orchestrator.config.schema import LimitsSection
from fl_orchestrator.core import events as ev
from fl_orchestrator.intake.loop import IntakeLoop
from fl_orchestrator.intake.quarantine import Quarantine
from fl_orchestrator.intake.reader import InboundReader
from fl_orchestrator.protocols.native import NativeWire
from fl_orchestrator.wire.layout import JobLayout
from fl_orchestrator.wire.messages import Envelope, ResultMessage, encode_result_frames, model_spec

SITE = "ds0@example.org"
MODEL = {"w": np.ones((2, 2), dtype=np.float32)}


def scene(tmp_path: Path, settle: float) -> tuple[IntakeLoop, Path, bytes]:
    layout = JobLayout(tmp_path / "root", "job", "agg@example.org")
    reader = InboundReader(layout, frozenset({SITE}), model_spec(MODEL), LimitsSection())
    quarantine = Quarantine(tmp_path / "quarantine", keep_originals=True)
    loop = IntakeLoop(NativeWire(layout), reader, quarantine, time.time, settle_seconds=settle)
    path = layout.result_path(SITE, "abc123")
    path.parent.mkdir(parents=True)
    result = ResultMessage(Envelope("job", 1, "m1", "abc123", 0.0, None), True, 5, {}, arrays=MODEL)
    data = b"".join(bytes(chunk) for chunk in encode_result_frames(result))
    return loop, path, data


def test_an_empty_then_complete_file_is_read_once_complete(tmp_path: Path) -> None:
    loop, path, data = scene(tmp_path, settle=5.0)
    path.write_bytes(b"")
    assert anyio.run(loop.take, path) == []
    path.write_bytes(data[: len(data) // 2])  # the sync client is still writing
    assert anyio.run(loop.take, path) == []
    path.write_bytes(data)
    [event] = anyio.run(loop.take, path)
    assert isinstance(event, ev.ResultReceived) and event.num_examples == 5
    assert loop.quarantine.counts == {} and loop.unsettled == {}


def test_a_file_that_stays_truncated_is_refused_after_it_settles(tmp_path: Path) -> None:
    loop, path, data = scene(tmp_path, settle=0.2)
    path.write_bytes(data[:10])
    assert anyio.run(loop.take, path) == []
    assert loop.quarantine.counts == {}
    time.sleep(0.25)
    assert anyio.run(loop.take, path) == []
    assert loop.quarantine.counts == {SITE: {"truncated": 1}}
    assert path.exists()  # copied, not moved


def test_the_intake_task_looks_again_when_a_file_is_due(tmp_path: Path) -> None:
    # No new event arrives for the file: the task itself must come back to it.
    loop, path, _ = scene(tmp_path, settle=0.0)
    path.write_bytes(b"")

    async def main() -> None:
        batches_send, batches_recv = anyio.create_memory_object_stream[list[Path]](4)
        events_send, _events_recv = anyio.create_memory_object_stream[ev.Event](4)
        async with anyio.create_task_group() as group:
            group.start_soon(loop.run, batches_recv, events_send)
            await batches_send.send([path])
            with anyio.fail_after(5):
                while not loop.quarantine.counts:
                    await anyio.sleep(0.01)
            group.cancel_scope.cancel()

    anyio.run(main)
    assert loop.quarantine.counts == {SITE: {"empty_file": 1}}
