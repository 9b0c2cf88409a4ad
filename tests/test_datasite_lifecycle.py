"""The datasite runner's lifecycle, as processes: it exits when the job ends, and says why it stops."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from fl_orchestrator.simulate.federation import DatasiteSpec, LocalFederation

from support import scripted
from support.jobs import job_table, site_emails, write_job

TESTS_DIR = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


def _events(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def _wait_exit(federation: LocalFederation, count: int, seconds: float) -> list[int | None]:
    deadline = time.monotonic() + seconds
    sites = federation.processes[:count]
    while time.monotonic() < deadline and any(p.poll() is None for p in sites):
        time.sleep(0.05)
    return [p.poll() for p in sites]


def test_runners_exit_0_when_the_job_ends_and_one_told_to_keep_running_does_not(tmp_path: Path) -> None:
    job = write_job(tmp_path, job_table(3, job={"num_rounds": 2}))
    federation = LocalFederation(job, tmp_path / "logs", extra_pythonpath=[TESTS_DIR])
    emails = site_emails(3)
    specs = [
        DatasiteSpec(e, "support.scripted:train", {scripted.ENV_INDEX: str(i)}) for i, e in enumerate(emails)
    ]
    keep = ("--train", "support.scripted:train", "--keep-running")
    specs[2] = DatasiteSpec(emails[2], "", {scripted.ENV_INDEX: "2"}, keep)
    try:
        federation.start_datasites(specs)
        events = list(federation.run_daemon(timeout_seconds=90))
        assert events[-1]["code"] == 0
        assert any(e.get("event") == "job.end_announced" for e in events)
        codes = _wait_exit(federation, 3, 20)
        assert codes[:2] == [0, 0]  # told by the aggregator's marker, they ended by themselves
        assert codes[2] is None  # --keep-running serves on
        for email in emails[:2]:
            names = [e["event"] for e in _events(tmp_path / "logs" / f"{email}.log")]
            assert "datasite.job_ended" in names and names[-1] == "datasite.stopped"
        federation.processes[2].send_signal(signal.SIGTERM)
        assert federation.processes[2].wait(timeout=10) == 0
        last = _events(tmp_path / "logs" / f"{emails[2]}.log")[-1]
        assert last["event"] == "datasite.stopped" and last["signal"] == "SIGTERM"
        assert last["abandoned_task"] is None  # nothing was being trained
    finally:
        federation.stop()


def _datasite_command(root: Path) -> list[str]:
    """`fl-orchestrator datasite` for ds0 of job1, JSON logs; the code flags are the caller's."""
    import sys

    tool = str(Path(sys.executable).with_name("fl-orchestrator"))
    where = ["--syftbox-root", str(root), "--create", "--job", "job1"]
    who = ["--email", "ds0@example.org", "--aggregator", "agg@example.org"]
    return [tool, "datasite", *where, *who, "--log-format", "json"]


def test_the_data_owners_module_is_found_in_the_folder_the_runner_starts_from(tmp_path: Path) -> None:
    import os
    import subprocess

    code = tmp_path / "owner"
    code.mkdir()
    (code / "my_training.py").write_text("def train(arrays, config):\n    return arrays, 1, {}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = _datasite_command(tmp_path / "root")
    missing = subprocess.run(
        [*command, "--train", "nowhere_here:train"],
        cwd=code,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert missing.returncode == 64 and "nowhere_here" in missing.stderr
    process = subprocess.Popen(
        [*command, "--train", "my_training:train"],
        cwd=code,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if '"datasite.ready"' in line:
                break
        else:
            raise AssertionError("the runner never became ready")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def test_a_runner_with_no_task_says_what_it_waits_for_at_start_and_again(tmp_path: Path) -> None:
    import os
    import subprocess

    from fl_orchestrator.wire.layout import JobLayout

    root = tmp_path / "root"
    command = [
        *_datasite_command(root),
        "--train",
        "support.scripted:train",
        "--waiting-log-interval-seconds",
        "0.3",
    ]
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    said: list[dict[str, object]] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if '"datasite.waiting"' not in line:
                continue
            said.append(json.loads(line))
            if len(said) == 2:
                # The job's folder appears (the coordinator started): the next line says so.
                JobLayout(root, "job1", "agg@example.org").aggregator_dir.mkdir(parents=True)
            if said[-1]["waiting_for"] == "a task" or len(said) > 40:
                break
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    assert said[0]["waiting_for"] == "the aggregator's job folder" and said[0]["level"] == "info"
    assert "--job 'job1'" in str(said[0]["hint"])
    assert said[-1]["waiting_for"] == "a task" and "[syftbox] datasites" in str(said[-1]["hint"])
