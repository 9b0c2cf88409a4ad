"""A file refused once is not refused again after a restart; the counts carry on (the real daemon)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from fl_orchestrator.config import load_config
from fl_orchestrator.wire.layout import JobLayout

from support.daemon_process import DaemonProcess
from support.jobs import job_table, site_emails, write_job

pytestmark = pytest.mark.slow


def _quarantined(status_path: Path, email: str) -> dict[str, int]:
    try:
        return dict(json.loads(status_path.read_text()).get("quarantined", {}).get(email, {}))
    except (OSError, ValueError):
        return {}


def _stop(daemon: DaemonProcess) -> None:
    daemon.process.send_signal(signal.SIGTERM)
    daemon.wait(timeout=20)


def test_junk_left_in_place_is_refused_once_across_restarts_and_still_counted(tmp_path: Path) -> None:
    # Nobody answers (the job waits a minute for its datasites); one datasite's folder holds junk,
    # which copy mode (the default) leaves where it is.
    job = write_job(tmp_path, job_table(2, job={"available_timeout_seconds": 60.0}))
    config = load_config(job)
    email = site_emails(2)[0]
    layout = JobLayout(config.syftbox.root, config.job.name, config.syftbox.aggregator_email)
    junk = layout.results_dir(email) / ("ab" * 16 + ".result")
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"\x00not a result at all\xff" * 10)
    status_path = config.state.state_dir / "status.json"

    first = DaemonProcess(job)
    try:
        first.wait_for("file.rejected", timeout=20)
        deadline = time.monotonic() + 10
        while _quarantined(status_path, email) != {"malformed": 1} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _quarantined(status_path, email) == {"malformed": 1}
    finally:
        _stop(first)
    assert junk.exists()

    second = DaemonProcess(job)
    try:
        read = second.wait_for("quarantine.ledger_read", timeout=20)
        assert read["records"] == 1 and read["refused_in_place"] == 1
        # Past the first rescan (2 s in these jobs): the file was looked at and skipped.
        second.wait_for("round.waiting_for_nodes", timeout=20)
        time.sleep(2.5)
        assert second.events("file.rejected") == []
        assert _quarantined(status_path, email) == {"malformed": 1}  # counted once, not twice
        # A new file at the same path is judged afresh.
        junk.write_bytes(b"\x01different junk\xfe" * 10)
        second.wait_for("file.rejected", timeout=20)
    finally:
        _stop(second)
