"""Two tiers of real daemons over one folder: the root's FedAvg equals the flat run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fl_orchestrator.config import load_config
from fl_orchestrator.simulate.federation import DatasiteSpec, LocalFederation
from fl_orchestrator.storage.models import ModelStore

from support import scripted
from support.jobs import site_emails, write_job
from support.tiers import flat_table, write_tiered

TESTS_DIR = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow
SITES = site_emails(6)
GROUPS = [SITES[:2], SITES[2:]]
ROUNDS = 3


def _specs(sites: list[str]) -> list[DatasiteSpec]:
    return [
        DatasiteSpec(email, "support.scripted:train", {scripted.ENV_INDEX: str(SITES.index(email))})
        for email in sites
    ]


def _final_model(job: Path) -> dict[str, np.ndarray]:
    config = load_config(job)
    return ModelStore(config.state.state_dir, config.job.name).load(ROUNDS)


def _run_flat(folder: Path) -> dict[str, np.ndarray]:
    job = write_job(folder, flat_table(SITES, num_rounds=ROUNDS))
    federation = LocalFederation(job, folder / "logs", extra_pythonpath=[TESTS_DIR])
    try:
        federation.start_datasites(_specs(SITES))
        events = list(federation.run_daemon(timeout_seconds=90))
    finally:
        federation.stop()
    assert events[-1]["code"] == 0, (folder / "logs" / "daemon.log").read_text()
    return _final_model(job)


def _events(log: Path) -> list[dict[str, object]]:
    lines = log.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_two_tier_fedavg_equals_the_flat_run(tmp_path: Path) -> None:
    flat = _run_flat(tmp_path / "flat")

    root_job, region_jobs = write_tiered(tmp_path / "tiered", GROUPS, num_rounds=ROUNDS)
    root = LocalFederation(root_job, tmp_path / "tiered" / "logs", extra_pythonpath=[TESTS_DIR])
    regions = []
    try:
        for index, job in enumerate(region_jobs):
            region = LocalFederation(job, tmp_path / "tiered" / "logs", extra_pythonpath=[TESTS_DIR])
            regions.append(region)
            region.start_daemon(job, f"region{index}")
            region.start_datasites(_specs(GROUPS[index]))
        events = list(root.run_daemon(timeout_seconds=120))
        assert events[-1]["code"] == 0, (tmp_path / "tiered" / "logs" / "daemon.log").read_text()
        # The root's end reaches the regions: each finishes its job and exits 0.
        deadline = time.monotonic() + 30
        for region in regions:
            for process in region.processes[:1]:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
                assert process.returncode == 0
    finally:
        for region in regions:
            region.stop()
        root.stop()

    tiered = _final_model(root_job)
    for name, value in flat.items():
        difference = np.linalg.norm(tiered[name].astype(np.float64) - value.astype(np.float64))
        assert difference <= 1e-6 * np.linalg.norm(value.astype(np.float64)), name

    completed = [e for e in events if e.get("event") == "round.completed"]
    assert [e["round"] for e in completed] == [1, 2, 3]
    assert all(e["succeeded"] == 2 and e.get("tier") == "root" for e in completed)
    # The root counted each region once, with the num_examples of all its datasites.
    region0 = _events(tmp_path / "tiered" / "logs" / "region0.log")
    answered = [e for e in region0 if e.get("event") == "round.completed"]
    assert [e["round"] for e in answered] == [1, 2, 3]
    assert all(e.get("tier") == "region" and e["succeeded"] == 2 for e in answered)
    # The root's round metrics add the regions' counts up; its status shows each region's.
    assert completed[0]["train_metrics"]["tier.succeeded"] == len(SITES)
    shown = subprocess.run(
        [sys.executable, "-m", "fl_orchestrator.cli.tool_main", "status", "--config", str(root_job)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "job rootjob (root)" in shown
    assert "region0@example.org: selected 2, results 2, failures 0, timeouts 0" in shown
    assert "region1@example.org: selected 4, results 4, failures 0, timeouts 0" in shown


def _expected_flat(job: Path) -> dict[str, np.ndarray]:
    from fl_orchestrator.storage.models import initial_model

    model = initial_model(load_config(job).model)
    for _ in range(ROUNDS):
        model = scripted.expected_fedavg(model, list(range(len(SITES))))
    return model


def _wait_for(log: Path, event: str, rnd: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and any(
            e.get("event") == event and e.get("round") == rnd for e in _events_tolerant(log)
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"no {event} for round {rnd} in {log}")


def _events_tolerant(log: Path) -> list[dict[str, object]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if isinstance(event, dict):
            found.append(event)
    return found


@pytest.mark.parametrize("tier", ["region", "region-and-its-datasites", "root"])
def test_a_tier_killed_mid_round_resumes_and_the_root_still_gets_the_flat_model(
    tmp_path: Path, tier: str
) -> None:
    root_job, region_jobs = write_tiered(
        tmp_path, GROUPS, num_rounds=ROUNDS, round_timeout_seconds=60.0, available_timeout_seconds=60.0
    )
    logs = tmp_path / "logs"
    root = LocalFederation(root_job, logs, extra_pythonpath=[TESTS_DIR])
    regions = [LocalFederation(job, logs, extra_pythonpath=[TESTS_DIR]) for job in region_jobs]
    slow = {scripted.ENV_DELAY: "0.6"}
    try:
        region0 = regions[0].start_daemon(region_jobs[0], "region0")
        regions[0].start_datasites(
            [DatasiteSpec(s.email, s.train, {**s.env, **slow}) for s in _specs(GROUPS[0])]
        )
        regions[1].start_daemon(region_jobs[1], "region1")
        regions[1].start_datasites(_specs(GROUPS[1]))
        root_daemon = root.start_daemon(root_job, "daemon")
        # kill -9 with round 2 dispatched and its results on the way.
        if tier.startswith("region"):
            _wait_for(logs / "region0.log", "round.dispatched", 2)
            region0.kill()
            region0.wait()
            if tier == "region-and-its-datasites":
                # They restart after the region, so they read round 2's tasks as the restarted
                # region left them: its model must still be the root's.
                for process in regions[0].processes[1:]:
                    process.kill()
                    process.wait()
                regions[0].processes[1:] = []
                for stale in (tmp_path / "syftbox").glob("datasites/ds[01]@example.org/**/results/*"):
                    stale.unlink()
            regions[0].start_daemon(region_jobs[0], "restarted")
            if tier == "region-and-its-datasites":
                regions[0].start_datasites(_specs(GROUPS[0]))
        else:
            _wait_for(logs / "daemon.log", "round.dispatched", 2)
            root_daemon.kill()
            root_daemon.wait()
            root_daemon = root.start_daemon(root_job, "restarted")
        code = root_daemon.wait(timeout=150)
    finally:
        for region in regions:
            region.stop()
        root.stop()
    root_log = logs / ("restarted.log" if tier == "root" else "daemon.log")
    assert code == 0, root_log.read_text()
    completed = [e for e in _events_tolerant(root_log) if e.get("event") == "round.completed"]
    assert [e["round"] for e in completed][-1] == ROUNDS
    assert all(e["succeeded"] == 2 for e in completed)
    expected = _expected_flat(root_job)
    tiered = _final_model(root_job)
    for name, value in expected.items():
        np.testing.assert_allclose(tiered[name], value, rtol=1e-6, atol=1e-6)
    restarted = _events_tolerant(logs / "restarted.log")
    assert any(e.get("event") == "round.completed" and e.get("round") == 2 for e in restarted)


def _simulate(job: Path, workdir: Path, *extra: str) -> str:
    command = [sys.executable, "-m", "fl_orchestrator.cli.tool_main", "simulate", "--config", str(job)]
    command += ["--datasites", "6", "--train", "support.sim_code:train"]
    command += ["--partition", "support.sim_code:partition", "--workdir", str(workdir), *extra]
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_simulate_tiers_gives_the_flat_simulations_model(tmp_path: Path) -> None:
    table = flat_table(SITES, num_rounds=ROUNDS)
    table["syftbox"]["root"] = "syftbox"
    job = write_job(tmp_path / "job", table)
    shown = _simulate(job, tmp_path / "tiered", "--tiers", "2")
    assert "6 datasites in 2 regions" in shown
    _simulate(job, tmp_path / "flat")
    tiered = ModelStore(tmp_path / "tiered" / "state", "flat").load(ROUNDS)
    flat = ModelStore(tmp_path / "flat" / "state", "flat").load(ROUNDS)
    for name, value in flat.items():
        difference = np.linalg.norm(tiered[name].astype(np.float64) - value.astype(np.float64))
        assert difference <= 1e-6 * np.linalg.norm(value.astype(np.float64)), name


def test_simulate_tiers_refuses_a_robust_strategy_with_the_reason(tmp_path: Path) -> None:
    table = flat_table(SITES, num_rounds=ROUNDS)
    table["strategy"] = {"name": "fedmedian"}
    job = write_job(tmp_path / "job", table)
    command = [sys.executable, "-m", "fl_orchestrator.cli.tool_main", "simulate", "--config", str(job)]
    command += ["--datasites", "6", "--tiers", "2", "--train", "support.sim_code:train"]
    command += ["--workdir", str(tmp_path / "work")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stdout + done.stderr
    assert "strategy.name = 'fedmedian'" in done.stderr
