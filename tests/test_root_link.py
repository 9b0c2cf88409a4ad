"""A region's link to its root (daemon/root_link.py): answers are kept per round and per root model."""

from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np
import pytest

from fl_orchestrator.core import events as ev
from fl_orchestrator.daemon.root_link import RegionAnswer, RegionRoundFailed, RootLink
from fl_orchestrator.storage.models import ModelStore

pytestmark = pytest.mark.anyio


def _summary(rnd: int) -> ev.RoundSummary:
    return ev.RoundSummary(
        round=rnd,
        attempt=1,
        selected=("a@x.org", "b@x.org", "c@x.org"),
        succeeded=("a@x.org", "b@x.org"),
        failed={"c@x.org": "ValueError"},
        timed_out=(),
        dispatched_at=0.0,
        closed_at=1.0,
        train_seconds={},
        num_examples=30,
        train_metrics={"loss": 0.5},
    )


def _link(tmp_path: Path) -> tuple[RootLink, ModelStore]:
    store = ModelStore(tmp_path, "region")
    link = RootLink(tmp_path, store, clock=lambda: 100.0)
    link.reference = {"w": np.zeros(3, np.float32)}
    return link, store


async def _answered_round(link: RootLink, store: ModelStore, root_model: dict[str, np.ndarray]) -> None:
    """Round 1 asked with root_model, run and recorded (what the daemon does between)."""
    send, receive = anyio.create_memory_object_stream[ev.Event](10)
    link.attach(send, lambda: 1)
    async with anyio.create_task_group() as group:

        async def region_round() -> None:
            event = await receive.receive()
            assert isinstance(event, ev.RootTask) and event.round == 1
            mean = {"w": np.full(3, 2.0, np.float32)}
            store.save(1, mean)
            link.record(_summary(1), mean)
            link.completed(1)

        group.start_soon(region_round)
        answer = await link.ask(1, root_model, {"lr": 0.1}, deadline=200.0)
    assert answer.num_examples == 30
    assert answer.metrics["tier.succeeded"] == 2 and answer.metrics["tier.failed"] == 1
    np.testing.assert_array_equal(answer.arrays["w"], np.full(3, 2.0, np.float32))


async def test_a_round_is_answered_again_from_its_record_for_the_same_root_model(tmp_path: Path) -> None:
    link, store = _link(tmp_path)
    root_model = {"w": np.ones(3, np.float32)}
    await _answered_round(link, store, root_model)
    again, _ = _link(tmp_path)  # a restarted region: nothing in memory
    answer = await again.ask(1, root_model, {"lr": 0.1}, deadline=200.0)
    assert answer.num_examples == 30


async def test_a_record_made_for_another_root_model_is_not_reused(tmp_path: Path) -> None:
    link, store = _link(tmp_path)
    await _answered_round(link, store, {"w": np.ones(3, np.float32)})
    again, _ = _link(tmp_path)
    send, _receive = anyio.create_memory_object_stream[ev.Event](10)
    again.attach(send, lambda: 2)  # the region has moved on: round 1 cannot run again
    with pytest.raises(RegionRoundFailed, match="not run for this model"):
        await again.ask(1, {"w": np.full(3, 7.0, np.float32)}, {}, deadline=200.0)


async def test_a_round_completed_between_the_asks_checks_is_answered_not_awaited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link, store = _link(tmp_path)
    root_model = {"w": np.ones(3, np.float32)}
    await _answered_round(link, store, root_model)
    # The ask's first look finds no record; the round's record and completion land just after.
    real = link.answered
    looks: list[int] = []

    def answered_after_the_first_look(rnd: int, sha: str) -> RegionAnswer | None:
        looks.append(rnd)
        return None if len(looks) == 1 else real(rnd, sha)

    monkeypatch.setattr(link, "answered", answered_after_the_first_look)
    send, receive = anyio.create_memory_object_stream[ev.Event](10)
    link.attach(send, lambda: 1)  # the machine has not moved on to round 2 yet
    with anyio.fail_after(5):
        answer = await link.ask(1, root_model, {}, deadline=200.0)
    assert answer.num_examples == 30
    assert receive.statistics().current_buffer_used == 0  # no RootTask that the machine would drop


async def test_the_roots_model_and_config_survive_a_restart(tmp_path: Path) -> None:
    link, _ = _link(tmp_path)
    root_model = {"w": np.arange(3, dtype=np.float32)}
    send, receive = anyio.create_memory_object_stream[ev.Event](10)
    link.attach(send, lambda: 1)
    async with anyio.create_task_group() as group:
        group.start_soon(link.ask, 1, root_model, {"lr": 0.25}, 200.0)
        await receive.receive()  # the round was opened: kill -9 here
        group.cancel_scope.cancel()
    restarted, _ = _link(tmp_path)
    restarted.load_offer(1)
    arrays, config, _sha = restarted.offered[1]
    np.testing.assert_array_equal(arrays["w"], root_model["w"])
    assert config == {"lr": 0.25}


async def test_a_root_model_that_does_not_fit_fails_the_round_with_the_reason(tmp_path: Path) -> None:
    link, _ = _link(tmp_path)
    send, _receive = anyio.create_memory_object_stream[ev.Event](10)
    link.attach(send, lambda: 1)
    with pytest.raises(RegionRoundFailed, match="does not fit"):
        await link.ask(1, {"w": np.ones(4, np.float32)}, {}, deadline=200.0)
