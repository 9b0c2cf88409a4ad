"""status.json follows heartbeats: "last seen" is live while nothing else happens (the real daemon)."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import pytest

from fl_orchestrator.config import load_config
from fl_orchestrator.storage.atomic import atomic_write
from fl_orchestrator.wire.layout import JobLayout
from fl_orchestrator.wire.messages import Envelope, HeartbeatMessage, encode_heartbeat

from support.daemon_process import DaemonProcess
from support.jobs import job_table, site_emails, write_job

pytestmark = pytest.mark.slow


def _beat(layout: JobLayout, job: str, email: str) -> None:
    beat = HeartbeatMessage(Envelope(job, 0, secrets.token_hex(8), None, time.time(), None), "idle")
    atomic_write(layout.heartbeat_path(email), [encode_heartbeat(beat)], durable=False)


def _last_seen(status_path: Path, email: str) -> float | None:
    try:
        status = json.loads(status_path.read_text())
    except (OSError, ValueError):
        return None
    value = status.get("datasites", {}).get(email, {}).get("last_seen")
    return float(value) if value is not None else None


def test_last_seen_in_status_json_moves_with_each_heartbeat_while_the_job_waits(tmp_path: Path) -> None:
    # Two datasites listed, one present: the job waits (available_timeout 60 s) and nothing but
    # heartbeats happens; each new heartbeat must show in status.json within about a second.
    job = write_job(tmp_path, job_table(2, job={"available_timeout_seconds": 60.0}))
    config = load_config(job)
    layout = JobLayout(config.syftbox.root, config.job.name, config.syftbox.aggregator_email)
    email = site_emails(2)[0]
    layout.app_dir(email).mkdir(parents=True)
    status_path = config.state.state_dir / "status.json"
    daemon = DaemonProcess(job)
    try:
        seen: list[float] = []
        for _ in range(3):
            _beat(layout, config.job.name, email)
            written = time.time()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                value = _last_seen(status_path, email)
                if value is not None and value >= written - 0.05:
                    seen.append(value)
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"status.json never showed the heartbeat of {written}: {daemon.output()[-2000:]}")
            time.sleep(1.2)
        assert seen == sorted(seen) and seen[-1] - seen[0] >= 2.0
    finally:
        daemon.kill()
