"""--log-file: every event as JSON in the file, while the console keeps its short human lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.daemon_process import run_to_end
from support.jobs import job_table, site_emails, write_job

pytestmark = pytest.mark.slow


def test_the_console_stays_human_and_short_while_the_file_gets_every_field(tmp_path: Path) -> None:
    # Ten datasites that never come: the wait names all ten, then the job fails (exit 1).
    job = write_job(tmp_path, job_table(10, job={"available_timeout_seconds": 1.0}))
    log_file = tmp_path / "logs" / "daemon.jsonl"
    log_file.parent.mkdir()
    daemon = run_to_end(job, expect=1, args=["--log-format", "console", "--log-file", str(log_file)])
    console = daemon.output()
    assert not any(line.startswith("{") for line in console.splitlines()), console
    waiting = next(line for line in console.splitlines() if "round.waiting_for_nodes" in line)
    assert "[10 items]" in waiting and "ds9@example.org" not in waiting  # cut to its size
    events = [json.loads(line) for line in log_file.read_text().splitlines()]
    (logged,) = [e for e in events if e["event"] == "round.waiting_for_nodes"]
    assert logged["missing"] == site_emails(10)  # the file keeps the whole list
    assert any(e["event"] == "job.failed" for e in events)


def test_a_log_file_that_cannot_be_opened_is_refused_before_the_job_starts(tmp_path: Path) -> None:
    job = write_job(tmp_path, job_table(2))
    daemon = run_to_end(job, expect=73, args=["--log-file", str(tmp_path / "missing" / "x.jsonl")])
    assert "--log-file" in daemon.output() and not (tmp_path / "state" / "run.json").exists()


def test_the_console_round_line_is_short_and_the_file_keeps_the_details(tmp_path: Path) -> None:
    from fl_orchestrator.simulate.federation import DatasiteSpec, LocalFederation

    from support import scripted
    from support.daemon_process import TESTS_DIR

    job = write_job(tmp_path, job_table(2, job={"num_rounds": 1}))
    federation = LocalFederation(job, tmp_path / "logs", extra_pythonpath=[TESTS_DIR])
    log_file = tmp_path / "daemon.jsonl"
    specs = [
        DatasiteSpec(e, "support.scripted:train", {scripted.ENV_INDEX: str(i)})
        for i, e in enumerate(site_emails(2))
    ]
    try:
        federation.start_datasites(specs)
        events = list(
            federation.run_daemon(
                timeout_seconds=60, extra_args=["--log-format", "console", "--log-file", str(log_file)]
            )
        )
    finally:
        federation.stop()
    assert events[-1]["code"] == 0
    (line,) = [e["line"] for e in events if e["event"] == "raw" and "round.completed" in e["line"]]
    assert "collect_seconds=" in line and "succeeded=2" in line
    assert "model=" not in line and "run=" not in line and "stragglers" not in line
    (accepted, *_) = [e["line"] for e in events if e["event"] == "raw" and "result.accepted" in e["line"]]
    assert "train_seconds=" in accepted and "fl.train_seconds" not in accepted and "path=" not in accepted
    (logged,) = [json.loads(x) for x in log_file.read_text().splitlines() if '"round.completed"' in x]
    assert logged["model"].endswith("global-r00001.msgpack") and "run" in logged
