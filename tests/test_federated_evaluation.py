"""Federated evaluation end to end: selected datasites score each new model locally."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_daemon import run_federation, scripted_train

from fl_orchestrator.daemon.lifecycle import EXIT_DONE, Daemon

from support import scripted
from support.jobs import job_table, site_emails, write_job

# In-process federations: left out of `make test-fast`.
pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def evaluate_for(index: int) -> Any:
    def evaluate(arrays: dict[str, np.ndarray], config: dict[str, Any]) -> tuple[int, dict[str, float]]:
        # A score that depends on the model it was sent, so the test can tell which one.
        return scripted.num_examples_of(index), {
            "mean_weight": float(np.mean(arrays["w"])),
            "site": float(index),
        }

    return evaluate


async def run(job: Path, *, evaluators: int) -> Daemon:
    evaluates = [evaluate_for(i) if i < evaluators else None for i in range(3)]
    return await run_federation(job, [scripted_train(i) for i in range(3)], evaluates=evaluates)


async def test_each_new_model_is_evaluated_by_the_datasites_and_metrics_are_weighted(tmp_path: Path) -> None:
    table = job_table(3, job={"num_rounds": 2, "fraction_evaluate": 1.0, "min_evaluate_nodes": 2})
    daemon = await run(write_job(tmp_path, table), evaluators=3)
    assert daemon.exit_code == EXIT_DONE
    lines = [json.loads(x) for x in (daemon.state_dir / "evaluations.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        model = daemon.store.load(line["round"])
        assert line["succeeded"] == site_emails(3) and line["num_examples"] == 60
        # Every site scored the round's new aggregate, weighted 10:20:30.
        assert line["metrics"]["mean_weight"] == pytest.approx(float(np.mean(model["w"])), rel=1e-6)
        assert line["metrics"]["site"] == pytest.approx((0 * 10 + 1 * 20 + 2 * 30) / 60)


async def test_a_site_without_an_evaluate_function_is_counted_as_failed(tmp_path: Path) -> None:
    table = job_table(3, job={"num_rounds": 1, "fraction_evaluate": 1.0, "min_evaluate_nodes": 1})
    daemon = await run(write_job(tmp_path, table), evaluators=2)
    (line,) = [json.loads(x) for x in (daemon.state_dir / "evaluations.jsonl").read_text().splitlines()]
    assert line["failed"] == {"ds2@example.org": "NoEvaluateFunction"}
    assert line["succeeded"] == ["ds0@example.org", "ds1@example.org"]
