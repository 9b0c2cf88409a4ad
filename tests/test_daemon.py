"""The daemon and datasite runners in one event loop: timeouts, stragglers and refusals."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from fl_orchestrator.config import load_config
from fl_orchestrator.config.render import config_to_table
from fl_orchestrator.daemon.lifecycle import EXIT_DONE, EXIT_JOB_FAILED, Daemon
from fl_orchestrator.datasite.runner import DatasiteRunner, RunnerSettings
from fl_orchestrator.wire.layout import JobLayout

from support import scripted
from support.jobs import AGGREGATOR, job_table, site_emails, write_job
from support.records import records_under

# In-process federations: left out of `make test-fast`.
pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def runner_for(
    config_path: Path, index: int, train: Any, *, evaluate: Any = None, part_bytes: int = 0
) -> DatasiteRunner:
    config = load_config(config_path)
    settings = RunnerSettings(
        root=config.syftbox.root,
        email=site_emails(len(config.syftbox.datasites))[index],
        aggregator=AGGREGATOR,
        job=config.job.name,
        train="unused:unused",
        heartbeat_interval_seconds=0.2,
        rescan_interval_seconds=0.5,
        part_bytes=part_bytes,
    )
    return DatasiteRunner(settings, train=train, evaluate=evaluate)


def scripted_train(
    index: int,
    *,
    delay_seconds: float = 0.0,
    fail_rounds: tuple[int, ...] = (),
    slow_rounds: tuple[int, ...] | None = None,
) -> Any:
    def train(arrays: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
        rnd = config["server-round"]
        if rnd in fail_rounds:
            raise ValueError(f"no data for round {rnd} at /secret/path")
        if delay_seconds and (slow_rounds is None or rnd in slow_rounds):
            time.sleep(delay_seconds)
        return scripted.scripted_update(arrays, index), scripted.num_examples_of(index), {"loss": 1.0}

    return train


async def run_federation(
    config_path: Path,
    trains: list[Any],
    *,
    limit_seconds: float = 30.0,
    evaluates: list[Any] | None = None,
    part_bytes: int = 0,
) -> Daemon:
    daemon = Daemon(load_config(config_path), handle_signals=False)
    with anyio.fail_after(limit_seconds):
        async with anyio.create_task_group() as group:
            for index, train in enumerate(trains):
                if train is not None:
                    evaluate = evaluates[index] if evaluates else None
                    runner = runner_for(config_path, index, train, evaluate=evaluate, part_bytes=part_bytes)
                    group.start_soon(runner.run)
            await daemon.run()
            group.cancel_scope.cancel()
    return daemon


def metrics_lines(daemon: Daemon) -> list[dict[str, Any]]:
    text = (daemon.state_dir / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


async def test_straggler_times_out_and_the_partial_set_is_aggregated(tmp_path: Path) -> None:
    # Three rounds: ds2's late round-1 answer can land in one batch with its round-2 answer,
    # and round 3 keeps the job open until the late one has been looked at.
    job = write_job(tmp_path, job_table(3, job={"num_rounds": 3, "round_timeout_seconds": 1.0}))
    slow = scripted_train(2, delay_seconds=1.3, slow_rounds=(1,))
    daemon = await run_federation(job, [scripted_train(0), scripted_train(1), slow])
    assert daemon.exit_code == EXIT_DONE
    line = metrics_lines(daemon)[0]
    assert line["succeeded"] == ["ds0@example.org", "ds1@example.org"]
    assert line["timed_out"] == ["ds2@example.org"]
    assert line["collect_seconds"] >= 1.0
    # Its round-1 answer lands after round 1 closed: refused, not counted.
    assert daemon.quarantine.counts["ds2@example.org"] == {"round_closed": 1}
    initial = daemon.store.load(0)
    expected = scripted.expected_fedavg(initial, [0, 1])
    np.testing.assert_allclose(daemon.store.load(1)["w"], expected["w"], rtol=1e-6)
    assert daemon.machine is not None
    assert daemon.machine.records["ds2@example.org"].timed_out == 1


async def test_failed_training_is_counted_and_reported_without_traceback(tmp_path: Path) -> None:
    job = write_job(tmp_path, job_table(3, job={"num_rounds": 1}))
    trains = [scripted_train(0), scripted_train(1), scripted_train(2, fail_rounds=(1,))]
    daemon = await run_federation(job, trains)
    assert daemon.exit_code == EXIT_DONE
    (line,) = metrics_lines(daemon)
    assert line["failed"] == {"ds2@example.org": "ValueError"}
    layout = JobLayout(daemon.config.syftbox.root, "testjob", AGGREGATOR)
    (result_file,) = layout.results_dir("ds2@example.org").glob("*.result")
    raw = result_file.read_bytes()
    assert b"ValueError" in raw and b"Traceback" not in raw


async def test_too_few_results_retries_then_fails_with_exit_1(tmp_path: Path) -> None:
    table = job_table(
        3, job={"num_rounds": 1, "round_timeout_seconds": 0.4, "min_train_nodes": 3, "max_round_retries": 1}
    )
    job = write_job(tmp_path, table)
    trains = [scripted_train(0), scripted_train(1), scripted_train(2, fail_rounds=(1,))]
    daemon = await run_federation(job, trains)
    assert daemon.exit_code == EXIT_JOB_FAILED
    status = json.loads((daemon.state_dir / "status.json").read_text())
    assert status["state"] == "failed" and "no retries left" in status["error"]
    assert daemon.store.rounds() == [0]


async def test_missing_datasites_end_the_job_after_available_timeout(tmp_path: Path) -> None:
    job = write_job(tmp_path, job_table(3, job={"available_timeout_seconds": 0.5}))
    started = time.monotonic()
    daemon = await run_federation(job, [scripted_train(0), None, None])
    assert daemon.exit_code == EXIT_JOB_FAILED
    assert time.monotonic() - started < 10
    assert "ds1@example.org, ds2@example.org" in (daemon.failure_reason or "")


async def test_bad_and_late_files_are_quarantined_and_the_job_goes_on(tmp_path: Path) -> None:
    job = write_job(tmp_path, job_table(3, job={"num_rounds": 2}))
    config = load_config(job)
    layout = JobLayout(config.syftbox.root, "testjob", AGGREGATOR)
    results = layout.results_dir("ds0@example.org")
    results.mkdir(parents=True)
    (results / "0123abcd.result").write_bytes(b"\x00garbage that is not msgpack")
    stranger = layout.results_dir("mallory@example.org")
    stranger.mkdir(parents=True)
    (stranger / "feed.result").write_bytes(b"whatever")
    daemon = await run_federation(job, [scripted_train(i) for i in range(3)])
    assert daemon.exit_code == EXIT_DONE
    assert daemon.store.rounds() == [0, 1, 2]
    counts = daemon.quarantine.counts
    assert counts["ds0@example.org"] == {"malformed": 1}
    # Kept in quarantine, left in place: under sync it belongs to the datasite. A small file
    # is kept in its record, as the bytes that were read.
    assert (results / "0123abcd.result").exists()
    (record,) = [
        r
        for r in records_under(daemon.state_dir / "quarantine")
        if r["source"] == str(results / "0123abcd.result")
    ]
    assert record["moved_to"] is None
    assert base64.b64decode(record["content_base64"]) == (results / "0123abcd.result").read_bytes()
    # A datasite outside the job is never even read: it is not watched.
    assert "mallory@example.org" not in counts
    assert (stranger / "feed.result").exists()


async def test_watcher_detects_results_quickly(tmp_path: Path) -> None:
    # With everyone answering at once the round must close long before any rescan.
    table = job_table(3, job={"num_rounds": 1}, daemon={"rescan_interval_seconds": 60.0})
    job = write_job(tmp_path, table)
    daemon = await run_federation(job, [scripted_train(i) for i in range(3)])
    (line,) = metrics_lines(daemon)
    assert line["collect_seconds"] < 5.0
    assert os.path.exists(line["model_path"])


async def test_the_effective_config_is_written_beside_the_state_and_reloads_identically(
    tmp_path: Path,
) -> None:
    job = write_job(tmp_path, job_table(3, job={"num_rounds": 1, "train_config": {"lr": 0.5, "tags": ["a"]}}))
    daemon = await run_federation(job, [scripted_train(i) for i in range(3)])
    effective = daemon.state_dir / "effective-config.toml"
    reloaded = load_config(effective)
    original = load_config(job)
    assert config_to_table(reloaded, for_toml=True) == config_to_table(original, for_toml=True)


async def test_configure_round_and_metrics_aggregation_hooks(tmp_path: Path) -> None:
    from fl_orchestrator.wire.frames import FrameLimits
    from fl_orchestrator.wire.messages import TaskMessage, decode_message

    from support import hooks

    hooks.SEEN.clear()
    table = job_table(
        3,
        job={
            "num_rounds": 2,
            "configure_round": "support.hooks:decaying_lr",
            "metrics_aggregation": "support.hooks:largest_loss",
        },
    )
    daemon = await run_federation(write_job(tmp_path, table), [scripted_train(i) for i in range(3)])
    assert daemon.exit_code == EXIT_DONE
    assert [rnd for rnd, _ in hooks.SEEN] == [1, 2]
    assert hooks.SEEN[0][1] == {}
    assert hooks.SEEN[1][1]["round"] == 1 and hooks.SEEN[1][1]["train"] == {"max_loss": 1.0, "reporters": 3.0}
    configs = {}
    for task_file in daemon.layout.tasks_dir("ds0@example.org").glob("*.task"):
        task = decode_message(
            task_file.read_bytes(), expect_kind="task", expect_job="testjob", limits=FrameLimits()
        )
        assert isinstance(task, TaskMessage)
        configs[task.config["server-round"]] = task.config
    assert configs[1]["lr"] == 1.0 and configs[2]["lr"] == 0.5
    assert [line["train_metrics"] for line in metrics_lines(daemon)] == [
        {"max_loss": 1.0, "reporters": 3.0}
    ] * 2


async def test_a_configure_round_that_returns_junk_fails_the_job_with_its_reason(tmp_path: Path) -> None:
    table = job_table(3, job={"configure_round": "support.hooks:bad_schedule"})
    daemon = await run_federation(write_job(tmp_path, table), [scripted_train(i) for i in range(3)])
    assert daemon.exit_code == EXIT_JOB_FAILED
    assert "job.configure_round failed for round 1" in (daemon.failure_reason or "")
