"""`fl-orchestrator simulate`, run as the installed command: the whole job against N simulated datasites."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fl_orchestrator.config import load_config
from fl_orchestrator.storage.models import ModelStore, initial_model

from support.daemon_process import TESTS_DIR
from support.jobs import job_table, write_job

pytestmark = pytest.mark.slow
TOOL = Path(sys.executable).with_name("fl-orchestrator")


def _simulate(job: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR))
    return subprocess.run(
        [str(TOOL), "simulate", "--config", str(job), "--workdir", str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def test_simulate_runs_the_job_against_n_datasites_with_their_partitions(tmp_path: Path) -> None:
    # 4 simulated datasites (sim-0000..3) in place of the job's own, each with its partition's settings.
    job = write_job(tmp_path, job_table(4, job={"num_rounds": 2, "min_train_nodes": 4}))
    done = _simulate(
        job,
        tmp_path / "sim",
        "--datasites",
        "4",
        "--train",
        "support.sim_code:train",
        "--partition",
        "support.sim_code:partition",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "simulating" in done.stdout and "4 datasites" in done.stdout
    lines = [line.split() for line in done.stdout.splitlines() if line.strip().split()[:1] in (["1"], ["2"])]
    assert [row[:5] for row in lines] == [["1", "4", "4", "0", "0"], ["2", "4", "4", "0", "0"]]
    # By hand: each round adds sum(step * examples) / sum(examples) = (10 + 40 + 90 + 160) / 100 = 3.
    config = load_config(tmp_path / "sim" / "job.toml")
    start = initial_model(load_config(job).model)
    final = ModelStore(config.state.state_dir, config.job.name).load(2)
    for name, array in start.items():
        np.testing.assert_allclose(final[name], array + 6.0, rtol=1e-6)
    assert config.syftbox.datasites[0] == "sim-0000@simulate.local"
    assert str(config.state.state_dir).startswith(str(tmp_path / "sim"))


def test_many_datasites_run_in_process_and_the_model_is_the_hand_computed_one(tmp_path: Path) -> None:
    # 60 datasites: past 20, simulate hosts them in one pool process (simulate/pool.py).
    count = 60
    job = write_job(tmp_path, job_table(count, job={"num_rounds": 2, "min_train_nodes": count}))
    done = _simulate(
        job,
        tmp_path / "sim",
        "--datasites",
        str(count),
        "--train",
        "support.sim_code:train",
        "--partition",
        "support.sim_code:partition",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "in-process runners" in done.stdout
    assert (tmp_path / "sim" / "logs" / "pool-0.log").exists()
    assert not list((tmp_path / "sim" / "logs").glob("sim-*.log"))  # no datasite processes
    lines = [line.split() for line in done.stdout.splitlines() if line.strip().split()[:1] in (["1"], ["2"])]
    assert [row[:5] for row in lines] == [["1", "60", "60", "0", "0"], ["2", "60", "60", "0", "0"]]
    # Datasite i steps i + 1 with 10 (i + 1) examples: sum(k^2) / sum(k) = (2n + 1) / 3 per round.
    step = sum(k * 10 * k for k in range(1, count + 1)) / sum(10 * k for k in range(1, count + 1))
    config = load_config(tmp_path / "sim" / "job.toml")
    start = initial_model(load_config(job).model)
    final = ModelStore(config.state.state_dir, config.job.name).load(2)
    for name, array in start.items():
        np.testing.assert_allclose(final[name], array + 2 * step, rtol=1e-6)
    # The whole job went by file events: no round waited for a rescan (10 s in a pool).
    assert all(float(row[6]) < 8.0 for row in lines), done.stdout


@pytest.mark.parametrize("runners", ["processes", "threads"])
def test_slow_and_flaky_datasites_show_as_timeouts_and_failures(tmp_path: Path, runners: str) -> None:
    table = job_table(
        3,
        # Long enough for a healthy datasite on a loaded machine; the slow one takes 1.6 x this.
        job={"num_rounds": 2, "min_train_nodes": 1, "round_timeout_seconds": 4.0, "max_round_retries": 1},
    )
    job = write_job(tmp_path, table)
    done = _simulate(
        job,
        tmp_path / "sim",
        "--datasites",
        "3",
        "--train",
        "support.sim_code:train",
        "--partition",
        "support.sim_code:partition",
        "--slow",
        "1",
        "--flaky",
        "1",
        "--runners",
        runners,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "slow: sim-" in done.stdout and "flaky: sim-" in done.stdout
    assert "timed out: sim-" in done.stdout  # the straggler, every round
    assert "failed: sim-" in done.stdout and "SimulatedFailure" in done.stdout  # the flaky one, in round 2


def test_a_careless_invocation_is_refused_with_the_reason(tmp_path: Path) -> None:
    job = write_job(tmp_path, job_table(2))
    done = _simulate(
        job, tmp_path / "sim", "--datasites", "2", "--train", "support.sim_code:train", "--slow", "3"
    )
    assert done.returncode == 64 and "need 3 datasites; there are 2" in done.stderr
