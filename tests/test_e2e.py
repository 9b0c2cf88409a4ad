"""The daemon and three datasite processes over a temporary folder, end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fl_orchestrator.cli.tool_main import main as tool_main
from fl_orchestrator.config import load_config
from fl_orchestrator.simulate.federation import DatasiteSpec, LocalFederation
from fl_orchestrator.storage.models import ModelStore, initial_model

from support import scripted
from support.jobs import job_table, site_emails, write_job

TESTS_DIR = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


def _federation(tmp_path: Path, table: dict) -> LocalFederation:  # type: ignore[type-arg]
    job = write_job(tmp_path, table)
    return LocalFederation(job, tmp_path / "logs", extra_pythonpath=[TESTS_DIR])


def _specs(count: int) -> list[DatasiteSpec]:
    return [
        DatasiteSpec(email, "support.scripted:train", {scripted.ENV_INDEX: str(i)})
        for i, email in enumerate(site_emails(count))
    ]


def test_three_datasites_fedavg_equals_hand_computed_average(tmp_path: Path) -> None:
    federation = _federation(tmp_path, job_table(3, job={"num_rounds": 3}))
    config = federation.config
    try:
        federation.start_datasites(_specs(3))
        events = list(federation.run_daemon(timeout_seconds=90))
    finally:
        federation.stop()
    exit_event = events[-1]
    assert exit_event["code"] == 0, (tmp_path / "logs" / "daemon.log").read_text()
    completed = [e for e in events if e["event"] == "round.completed"]
    assert [e["round"] for e in completed] == [1, 2, 3]
    assert all(e["succeeded"] == 3 and e["timed_out"] == 0 for e in completed)
    # Train metrics are weighted by num_examples: (0*10 + 1*20 + 2*30) / 60.
    assert completed[0]["train_metrics"]["loss"] == pytest.approx(80 / 60)
    assert "fl.train_seconds" not in completed[0]["train_metrics"]  # the runner's time is no metric

    store = ModelStore(config.state.state_dir, config.job.name)
    assert store.rounds() == [0, 1, 2, 3]
    expected = initial_model(config.model)
    for rnd in (0, 1, 2, 3):
        if rnd:
            expected = scripted.expected_fedavg(expected, [0, 1, 2])
        saved = store.load(rnd)
        for name, value in expected.items():
            scale = max(1.0, float(np.max(np.abs(value))))
            assert np.max(np.abs(saved[name].astype(np.float64) - value)) <= 1e-6 * scale

    lines = (config.state.state_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]
    status = json.loads((config.state.state_dir / "status.json").read_text())
    assert status["state"] == "done"
    assert all(record["succeeded"] == 3 for record in status["datasites"].values())
    # Each runner timed its own train calls; dispatch to result (train_seconds_total) includes more.
    for record in status["datasites"].values():
        assert record["runner_timed"] == 3
        assert 0 <= record["runner_train_seconds_total"] <= record["train_seconds_total"]
    # The same snapshot as Prometheus metrics, for node_exporter's textfile collector.
    from prometheus_client.parser import text_string_to_metric_families

    prom = (config.state.state_dir / "fl_orchestrator.prom").read_text()
    samples = {
        (s.name, s.labels.get("datasite")): s.value
        for family in text_string_to_metric_families(prom)
        for s in family.samples
    }
    assert samples[("fl_orchestrator_rounds_completed_total", None)] == 3
    assert samples[("fl_orchestrator_round", None)] == 3
    assert all(samples[("fl_orchestrator_datasite_succeeded_total", d)] == 3 for d in status["datasites"])
    assert samples[("fl_orchestrator_bytes_written_total", None)] > 0

    out = tmp_path / "final.npz"
    assert tool_main(["export", "--config", str(federation.config_path), "--out", str(out)]) == 0
    with np.load(out) as archive:
        assert np.array_equal(archive["w"], store.load(3)["w"])


def test_sigterm_stops_the_daemon_cleanly_within_the_deadline(tmp_path: Path) -> None:
    # Only two of three datasites run, so the daemon waits for nodes until stopped.
    job = write_job(tmp_path, job_table(3, job={"available_timeout_seconds": 60.0}))
    config = load_config(job)
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR), FL_ORCHESTRATOR_LOG_FORMAT="json")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "fl_orchestrator.cli.daemon_main", "--config", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        status_file = config.state.state_dir / "status.json"
        deadline = time.monotonic() + 30
        while not status_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status_file.exists()
        sent = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert daemon.stdout is not None
    output = daemon.stdout.read().decode()
    assert code == 0, output
    assert elapsed < 5.0
    assert '"daemon.stopping"' in output and '"daemon.stopped"' in output
    assert json.loads(status_file.read_text())["state"] == "stopped"
