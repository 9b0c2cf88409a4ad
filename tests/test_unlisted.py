"""A datasite outside the job that writes heartbeats is said once per presence_ttl, never refused."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from fl_orchestrator.config.schema import LimitsSection
from fl_orchestrator.intake.loop import IntakeLoop
from fl_orchestrator.intake.quarantine import Quarantine
from fl_orchestrator.intake.reader import InboundReader
from fl_orchestrator.protocols.native import NativeWire
from fl_orchestrator.wire.layout import JobLayout
from fl_orchestrator.wire.messages import Envelope, HeartbeatMessage, encode_heartbeat, model_spec

pytestmark = pytest.mark.anyio
MEMBER, STRANGER = "member@example.org", "forgotten@example.org"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_an_unlisted_datasites_heartbeats_are_said_once_per_ttl_and_never_quarantined(
    tmp_path: Path,
) -> None:
    layout = JobLayout(tmp_path / "box", "job", "agg@example.org")
    reader = InboundReader(
        layout, frozenset({MEMBER}), model_spec({"w": np.zeros(2, np.float32)}), LimitsSection()
    )
    quarantine = Quarantine(tmp_path / "quarantine", keep_originals=True)
    intake = IntakeLoop(NativeWire(layout), reader, quarantine, time.time, unlisted_log_seconds=60)
    path = layout.heartbeat_path(STRANGER)
    path.parent.mkdir(parents=True)
    with capture_logs() as logs:
        for beat in range(3):  # a heartbeat every few seconds, each a new file
            message = HeartbeatMessage(Envelope("job", 0, f"m{beat}", None, time.time(), None), "idle")
            path.write_bytes(encode_heartbeat(message))
            path.touch()
            assert await intake.take(path) == []
    said = [entry for entry in logs if entry["event"] == "datasite.unlisted"]
    assert len(said) == 1 and said[0]["datasite"] == STRANGER and "add it" in said[0]["hint"]
    assert not any(entry["event"] == "file.rejected" for entry in logs)
    assert quarantine.snapshot_counts() == {}
    assert not (tmp_path / "quarantine").exists()
