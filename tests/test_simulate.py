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


def test_slow_and_flaky_datasites_show_as_timeouts_and_failures(tmp_path: Path) -> None:
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
