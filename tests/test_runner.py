"""The datasite runner: waiting for models, bad train output, failures reported as results."""

from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from fl_orchestrator.datasite.runner import DatasiteRunner, RunnerSettings
from fl_orchestrator.protocols.native import Publisher
from fl_orchestrator.wire.frames import FrameLimits
from fl_orchestrator.wire.layout import JobLayout
from fl_orchestrator.wire.messages import RUNNER_SECONDS_METRIC, ResultMessage, decode_message

# In-process federations: left out of `make test-fast`.
pytestmark = [pytest.mark.anyio, pytest.mark.integration]
AGG, SITE, JOB = "agg@example.org", "ds0@example.org", "job1"
MODEL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, dtype=np.float32)}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def runner(root: Path, train: Any, rescan_interval_seconds: float = 0.3) -> DatasiteRunner:
    settings = RunnerSettings(
        root=root,
        email=SITE,
        aggregator=AGG,
        job=JOB,
        train="x:y",
        heartbeat_interval_seconds=0.2,
        rescan_interval_seconds=rescan_interval_seconds,
    )
    return DatasiteRunner(settings, train=train)


def publish(root: Path, *, write_model: bool = True, task_id: str = "a1") -> tuple[JobLayout, Publisher, Any]:
    layout = JobLayout(root, JOB, AGG)
    publisher = Publisher(layout, (SITE,))
    broadcast = publisher.write_model(1, MODEL)
    model_path = layout.aggregator_dir / broadcast.ref.path
    held = model_path.read_bytes()
    if not write_model:
        model_path.unlink()
    publisher.write_tasks(broadcast, {SITE: task_id}, attempt=1, deadline=time.time() + 30, config={"lr": 1})
    return layout, publisher, (model_path, held)


async def result_of(root: Path, train: Any, *, before: Any = None, task_id: str = "a1") -> ResultMessage:
    layout = JobLayout(root, JOB, AGG)
    path = layout.result_path(SITE, task_id)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(runner(root, train).run)
            if before is not None:
                await before()
            while not path.exists():
                await anyio.sleep(0.02)
            group.cancel_scope.cancel()
    message = decode_message(path.read_bytes(), expect_kind="result", expect_job=JOB, limits=FrameLimits())
    assert isinstance(message, ResultMessage)
    return message


def good_train(arrays: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
    return {k: v + 1 for k, v in arrays.items()}, 7, {"loss": 0.25}


async def test_trains_and_replies_with_arrays_examples_and_metrics(tmp_path: Path) -> None:
    publish(tmp_path)
    result = await result_of(tmp_path, good_train)
    assert result.ok and result.num_examples == 7
    # Beside the train function's metrics, the runner's own time in it (how long training took).
    seconds = result.metrics.pop(RUNNER_SECONDS_METRIC)
    assert result.metrics == {"loss": 0.25} and 0 <= seconds < 5
    assert result.envelope.reply_to == "a1" and result.envelope.round == 1
    np.testing.assert_array_equal(result.arrays["w"], MODEL["w"] + 1)


async def test_a_task_sent_right_after_the_first_heartbeat_is_seen_by_its_file_event(tmp_path: Path) -> None:
    # The rescan is a minute away: only file events can bring this task in time. The aggregator's
    # job folder arrives in one move, tasks and model inside it, as a sync may make a folder; no
    # event names the task itself, so the folder's arrival must make the runner look inside.
    root, staging = tmp_path / "root", tmp_path / "staging"
    layout = JobLayout(root, JOB, AGG)
    result = layout.result_path(SITE, "a1")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(runner(root, good_train, rescan_interval_seconds=60).run)
            while not layout.heartbeat_path(SITE).exists():
                await anyio.sleep(0.005)
            await anyio.sleep(0.3)  # past the runner's first scan, which is at its start
            publish(staging)
            layout.aggregator_dir.parent.mkdir(parents=True)
            JobLayout(staging, JOB, AGG).aggregator_dir.rename(layout.aggregator_dir)
            while not result.exists():
                await anyio.sleep(0.02)
            group.cancel_scope.cancel()
    assert not (layout.app_dir(SITE) / ".watch-probe").exists()  # the readiness probe is cleaned up


async def test_a_runner_answers_its_own_tasks_only(tmp_path: Path) -> None:
    # Every runner watches the whole tree; another datasite's task is never its to answer.
    other = "ds1@example.org"
    layout = JobLayout(tmp_path, JOB, AGG)
    publisher = Publisher(layout, (SITE, other))
    broadcast = publisher.write_model(1, MODEL)
    deadline = time.time() + 30
    calls: list[int] = []

    def counting_train(arrays: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
        calls.append(1)
        return good_train(arrays, config)

    async def then_its_own() -> None:
        await anyio.sleep(0.2)
        publisher.write_tasks(broadcast, {other: "b1"}, attempt=1, deadline=deadline, config={})
        await anyio.sleep(0.3)
        publisher.write_tasks(broadcast, {SITE: "a1"}, attempt=1, deadline=deadline, config={})

    await result_of(tmp_path, counting_train, before=then_its_own)
    assert calls == [1]
    assert sorted(p.name for p in layout.results_dir(SITE).iterdir()) == ["a1.result"]


async def test_waits_for_a_model_that_has_not_synced_yet(tmp_path: Path) -> None:
    _, _, (model_path, held) = publish(tmp_path, write_model=False)
    seen_before_model: list[bool] = []

    async def deliver_model_later() -> None:
        await anyio.sleep(0.4)
        seen_before_model.append(JobLayout(tmp_path, JOB, AGG).result_path(SITE, "a1").exists())
        model_path.write_bytes(held[: len(held) // 2])  # a partial sync first
        await anyio.sleep(0.2)
        model_path.write_bytes(held)

    result = await result_of(tmp_path, good_train, before=deliver_model_later)
    assert seen_before_model == [False]
    assert result.ok


@pytest.mark.parametrize(
    ("output", "fragment"),
    [
        (({"w": MODEL["w"].astype(np.float64), "b": MODEL["b"]}, 1, {}), "float64"),
        (({"w": MODEL["w"]}, 1, {}), "missing ['b']"),
        (({"w": MODEL["w"] * np.nan, "b": MODEL["b"]}, 1, {}), "NaN"),
        (({"w": MODEL["w"], "b": MODEL["b"]}, 0, {}), "num_examples"),
        (({"w": MODEL["w"], "b": MODEL["b"]}, 3, {"m": "text"}), "metric 'm'"),
        ((MODEL, 3), "must return"),
    ],
)
async def test_bad_train_output_becomes_an_error_result(tmp_path: Path, output: Any, fragment: str) -> None:
    publish(tmp_path)
    result = await result_of(tmp_path, lambda arrays, config: output)
    assert not result.ok
    assert result.error_type == "TrainOutputError"
    assert fragment in (result.error_message or "")


async def test_an_exception_is_reported_by_type_and_message_only(tmp_path: Path) -> None:
    publish(tmp_path)

    def failing(arrays: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
        raise KeyError("column 'age' missing")

    result = await result_of(tmp_path, failing)
    assert not result.ok and result.error_type == "KeyError"
    assert result.error_message == "\"column 'age' missing\""
    assert result.arrays == {}


async def test_a_train_function_that_takes_a_context_learns_who_and_when(tmp_path: Path) -> None:
    publish(tmp_path, task_id="c7")
    seen: list[Any] = []

    def train(arrays: dict[str, np.ndarray], config: dict[str, Any], context: Any) -> Any:
        seen.append(context)
        return good_train(arrays, config)

    result = await result_of(tmp_path, train, task_id="c7")
    assert result.ok
    (context,) = seen
    assert (context.email, context.round, context.task_id) == (SITE, 1, "c7")
    assert context.node_id == zlib.crc32(SITE.encode())
    assert context.node_config == {}  # the data owner gave none (--node-config)
