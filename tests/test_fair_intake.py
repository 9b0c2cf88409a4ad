"""A party that floods its folder delays only itself: the fair queue and the intake over it."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import anyio
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fl_orchestrator.config.schema import LimitsSection
from fl_orchestrator.core import events as ev
from fl_orchestrator.intake.fair_queue import FairQueue
from fl_orchestrator.intake.loop import PATHS_PER_HOP, IntakeLoop
from fl_orchestrator.intake.quarantine import Quarantine
from fl_orchestrator.intake.reader import InboundReader
from fl_orchestrator.intake.watcher import PathBatch
from fl_orchestrator.protocols.native import NativeWire
from fl_orchestrator.wire.layout import JobLayout
from fl_orchestrator.wire.messages import Envelope, ResultMessage, encode_result_frames, model_spec

pytestmark = pytest.mark.anyio
MODEL = {"w": np.zeros(4, dtype=np.float32)}
FLOODER, HONEST = "flood@example.org", "honest@example.org"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 30)), max_size=200))
def test_each_party_gets_a_turn_and_nothing_is_lost_or_doubled(pushes: list[tuple[str, int]]) -> None:
    queue = FairQueue(per_party_limit=1000)
    expected: dict[str, list[Path]] = {}
    for party, number in pushes:
        path = Path(f"/{party}/{number}")
        if queue.push(party, path):
            expected.setdefault(party, []).append(path)
    popped = list(iter(queue.pop, None))
    assert sorted(popped) == sorted(p for paths in expected.values() for p in paths)
    assert len(queue) == 0
    for party, paths in expected.items():  # each party's own order is kept
        assert [p for p in popped if p.parts[1] == party] == paths
    # While two parties still have work, no party is served twice in a row.
    owner = [p.parts[1] for p in popped]
    for index in range(1, len(owner)):
        if owner[index] == owner[index - 1]:
            assert set(owner[index:]) == {owner[index]}


def test_a_full_queue_drops_and_counts_but_other_parties_still_queue() -> None:
    queue = FairQueue(per_party_limit=3)
    assert all(queue.push("a", Path(f"/a/{n}")) for n in range(3))
    assert not queue.push("a", Path("/a/3"))
    assert not queue.push("a", Path("/a/0"))  # already queued: not a drop
    assert queue.dropped == {"a": 1}
    assert queue.push("b", Path("/b/0"))
    assert [queue.pop(), queue.pop()] == [Path("/a/0"), Path("/b/0")]


def _honest_result(task: str) -> bytes:
    result = ResultMessage(Envelope("job", 1, "m", task, 0.0, None), True, 5, {}, arrays=MODEL)
    return b"".join(bytes(chunk) for chunk in encode_result_frames(result))


async def test_an_honest_result_behind_a_flood_is_taken_in_the_first_hop(tmp_path: Path) -> None:
    layout = JobLayout(tmp_path / "box", "job", "agg@example.org")
    reader = InboundReader(layout, frozenset({FLOODER, HONEST}), model_spec(MODEL), LimitsSection())
    quarantine = Quarantine(tmp_path / "quarantine", keep_originals=True)
    loop = IntakeLoop(NativeWire(layout), reader, quarantine, time.time, settle_seconds=60)
    refusals_told: list[int] = []
    loop.on_refused = lambda: refusals_told.append(1)  # the daemon rewrites status.json then
    junk = layout.results_dir(FLOODER)
    junk.mkdir(parents=True)
    flood = [junk / f"{secrets.token_hex(16)}.result" for _ in range(2000)]
    for path in flood:
        path.write_bytes(os.urandom(200))
    honest = layout.result_path(HONEST, "t1")
    honest.parent.mkdir(parents=True)
    honest.write_bytes(_honest_result("t1"))

    batches_send, batches_recv = anyio.create_memory_object_stream[PathBatch](100)
    events_send, events_recv = anyio.create_memory_object_stream[ev.Event](0)
    # The flood's events come first, all of them, then the honest one.
    for start in range(0, len(flood), 64):
        batches_send.send_nowait(flood[start : start + 64])
    batches_send.send_nowait([honest])
    async with anyio.create_task_group() as group:
        group.start_soon(loop.run, batches_recv, events_send)
        with anyio.fail_after(10):
            event = await events_recv.receive()
        refused_before = sum(sum(r.values()) for r in quarantine.snapshot_counts().values())
        group.cancel_scope.cancel()
    assert isinstance(event, ev.ResultReceived) and event.datasite == HONEST
    # Junk read before it: at most a hop's worth, not the 2,000 queued ahead of it.
    assert refused_before <= PATHS_PER_HOP, refused_before
    assert len(refusals_told) >= refused_before


def test_a_party_that_overflowed_is_listed_again_once_its_queue_runs_dry() -> None:
    queue = FairQueue(per_party_limit=2)
    for n in range(5):
        queue.push("a", Path(f"/a/{n}"))
    queue.push("b", Path("/b/0"))
    assert queue.drained_overflowed() == []  # "a" still has work queued
    assert [queue.pop() for _ in range(3)] == [Path("/a/0"), Path("/b/0"), Path("/a/1")]
    assert queue.drained_overflowed() == ["a"]
    assert queue.drained_overflowed() == []  # once per overflow


async def test_a_flood_bigger_than_the_queue_is_all_refused_without_waiting_for_the_rescan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = JobLayout(tmp_path / "box", "job", "agg@example.org")
    reader = InboundReader(layout, frozenset({FLOODER}), model_spec(MODEL), LimitsSection())
    quarantine = Quarantine(tmp_path / "quarantine", keep_originals=True)
    loop = IntakeLoop(NativeWire(layout), reader, quarantine, time.time, settle_seconds=60)
    loop.queue = FairQueue(per_party_limit=10)
    junk = layout.results_dir(FLOODER)
    junk.mkdir(parents=True)
    flood = [junk / f"{secrets.token_hex(16)}.result" for _ in range(100)]
    for path in flood:
        path.write_bytes(bytes(40))  # malformed, never "truncated": refused at once
    batches_send, batches_recv = anyio.create_memory_object_stream[PathBatch](100)
    events_send, _events_recv = anyio.create_memory_object_stream[ev.Event](0)
    for start in range(0, len(flood), 20):  # the watcher's events; no rescan will come
        batches_send.send_nowait(flood[start : start + 20])
    async with anyio.create_task_group() as group:
        group.start_soon(loop.run, batches_recv, events_send)
        with anyio.move_on_after(10):
            while sum(quarantine.snapshot_counts().get(FLOODER, {}).values()) < len(flood):
                await anyio.sleep(0.02)
        group.cancel_scope.cancel()
    assert quarantine.snapshot_counts()[FLOODER] == {"malformed": len(flood)}
    assert loop.queue.dropped[FLOODER] > 0  # the queue did overflow
