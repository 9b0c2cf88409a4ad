"""Crash safety: kill -9 the daemon at random instants and at every state-write point.

The run must end with the same model as an uninterrupted run, the same
results counted in every round, and nothing counted twice. ``make chaos``
runs the long version (CHAOS_KILLS=100).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_orchestrator.config import load_config
from fl_orchestrator.simulate.federation import DatasiteSpec, LocalFederation
from fl_orchestrator.storage.failpoints import ENV as FAILPOINTS_ENV
from fl_orchestrator.storage.models import ModelStore
from fl_orchestrator.storage.round_log import ResultRecord, read_records

from support import scripted
from support.jobs import job_table, site_emails, write_job

TESTS_DIR = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow

MIN_RANDOM_KILLS = int(os.environ.get("CHAOS_KILLS", "20"))
# Enough rounds that the job outlives the kills: a life of 0.3-0.9 s makes several rounds of
# progress (3 at first; up to 8 since the runners answer a task the moment it lands).
NUM_ROUNDS = max(200, 10 * MIN_RANDOM_KILLS)
FAILPOINTS = [
    "round_log.before_append",
    "round_log.after_append",
    "dispatch.after_log",
    "dispatch.after_model",
    "dispatch.after_tasks",
    "fold.after",
    "aggregate.before_finish",
    "aggregate.after_model_saved",
    "checkpoint.before_write",
    "checkpoint.after_write",
]


def _job(folder: Path) -> Path:  # the chaos job
    table = job_table(
        3,
        job={"num_rounds": NUM_ROUNDS, "round_timeout_seconds": 60.0, "min_train_nodes": 3},
        daemon={"rescan_interval_seconds": 1.0},
    )
    return write_job(folder, table)


def _start_datasites(job: Path) -> LocalFederation:
    federation = LocalFederation(job, job.parent / "logs", extra_pythonpath=[TESTS_DIR])
    federation.start_datasites(
        [
            DatasiteSpec(
                email, "support.scripted:train", {scripted.ENV_INDEX: str(i), scripted.ENV_DELAY: "0.05"}
            )
            for i, email in enumerate(site_emails(3))
        ],
        heartbeat_interval_seconds=0.2,
    )
    return federation


def _daemon(job: Path, failpoints: str = "") -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR), FL_ORCHESTRATOR_LOG_FORMAT="json")
    if failpoints:
        env[FAILPOINTS_ENV] = failpoints
    log = open(job.parent / "daemon.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "fl_orchestrator.cli.daemon_main", "--config", str(job)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    finally:
        log.close()


def _run_to_completion(job: Path, limit_seconds: float = 120.0) -> int:
    daemon = _daemon(job)
    try:
        return daemon.wait(timeout=limit_seconds)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def _accepted_per_round(state_dir: Path) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for rnd in range(1, NUM_ROUNDS + 1):
        records = list(read_records(state_dir / "rounds" / f"r{rnd:05d}.log"))
        found[rnd] = [r.datasite for r in records if isinstance(r, ResultRecord) and r.ok]
    return found


def _status(state_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((state_dir / "run.json").read_text())
    return result


def test_kill_9_at_random_instants_and_write_points_changes_nothing(tmp_path: Path) -> None:
    reference_job = _job(tmp_path / "reference")
    chaos_job = _job(tmp_path / "chaos")
    started = time.monotonic()

    federation = _start_datasites(reference_job)
    try:
        assert _run_to_completion(reference_job) == 0
    finally:
        federation.stop()
    reference = load_config(reference_job)

    rng = random.Random(20261129)
    kills = {"random": 0, "failpoint": 0}
    federation = _start_datasites(chaos_job)
    try:
        chaos = load_config(chaos_job)
        lives = 0
        plan = list(FAILPOINTS)
        while kills["random"] < MIN_RANDOM_KILLS or plan:
            lives += 1
            assert lives < 400, f"no progress after {lives} restarts: {kills}"
            point = f"{plan.pop(0)}:1" if plan and lives % 2 == 0 else ""
            daemon = _daemon(chaos_job, point)
            try:
                code = daemon.wait(timeout=rng.uniform(0.3, 0.9) if not point else 20.0)
            except subprocess.TimeoutExpired:
                daemon.send_signal(signal.SIGKILL)
                code = daemon.wait()
                kills["random"] += 1
                continue
            if code == -signal.SIGKILL:
                kills["failpoint"] += 1
            elif code == 0 and _status(chaos.state.state_dir)["status"] == "done":
                break  # finished before enough kills: the loop below reports it
            else:
                pytest.fail(f"daemon exited {code}; see {chaos_job.parent / 'daemon.log'}")
        assert _run_to_completion(chaos_job) == 0
    finally:
        federation.stop()
    elapsed = time.monotonic() - started
    print(f"\nchaos: {kills} kills survived in {lives} lives, {elapsed:.1f} s")
    assert kills["random"] >= MIN_RANDOM_KILLS, f"the job finished after only {kills} kills"
    assert kills["failpoint"] >= 1

    ref_store = ModelStore(reference.state.state_dir, reference.job.name)
    chaos_store = ModelStore(chaos.state.state_dir, chaos.job.name)
    assert chaos_store.rounds() == ref_store.rounds() == list(range(NUM_ROUNDS + 1))
    for rnd in ref_store.rounds():
        want, got = ref_store.load(rnd), chaos_store.load(rnd)
        for name, value in want.items():
            scale = max(1.0, float(np.max(np.abs(value))))
            assert float(np.max(np.abs(got[name] - value))) <= 1e-6 * scale, (rnd, name)

    ref_sets = _accepted_per_round(reference.state.state_dir)
    chaos_sets = _accepted_per_round(chaos.state.state_dir)
    for rnd in range(1, NUM_ROUNDS + 1):
        assert sorted(chaos_sets[rnd]) == sorted(ref_sets[rnd]), rnd
        assert len(chaos_sets[rnd]) == len(set(chaos_sets[rnd])), f"round {rnd} counted a result twice"
    lines = [json.loads(x) for x in (chaos.state.state_dir / "metrics.jsonl").read_text().splitlines() if x]
    assert [line["round"] for line in lines] == list(range(1, NUM_ROUNDS + 1))
    status = json.loads((chaos.state.state_dir / "status.json").read_text())
    assert {name: r["succeeded"] for name, r in status["datasites"].items()} == dict.fromkeys(
        site_emails(3), NUM_ROUNDS
    )


@pytest.mark.parametrize(
    "point", ["aggregate.before_finish", "aggregate.after_model_saved", "checkpoint.before_write"]
)
def test_a_restart_after_a_crash_mid_aggregation_finishes_the_job(tmp_path: Path, point: str) -> None:
    # Regression: the replayed aggregate's RoundAggregated was dropped and the job hung.
    table = job_table(3, job={"num_rounds": 3, "min_train_nodes": 3, "round_timeout_seconds": 60.0})
    job = write_job(tmp_path, table)
    federation = _start_datasites(job)
    try:
        crashed = _daemon(job, f"{point}:2")
        assert crashed.wait(timeout=60) == -signal.SIGKILL
        assert _run_to_completion(job, limit_seconds=60) == 0
    finally:
        federation.stop()
    config = load_config(job)
    assert ModelStore(config.state.state_dir, config.job.name).rounds() == [0, 1, 2, 3]
    assert _status(config.state.state_dir)["status"] == "done"
