"""The intake's fold gate: one decoded result in memory at a time, and never a stalled intake."""

from __future__ import annotations

import anyio
import pytest

from fl_orchestrator.intake.fold_gate import FoldGate

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_an_open_gate_passes_at_once() -> None:
    gate = FoldGate(bound_seconds=5.0)
    with anyio.fail_after(1):
        await gate.passed()


async def test_a_closed_gate_passes_when_the_round_loop_releases_it_while_the_intake_waits() -> None:
    gate = FoldGate(bound_seconds=30.0)
    gate.close()
    passed_at: list[float] = []

    async def intake() -> None:
        await gate.passed()
        passed_at.append(anyio.current_time())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(intake)
            await anyio.sleep(0.05)
            assert not passed_at  # still waiting: the result sent last is not let go
            gate.release()
    assert passed_at
    # Once passed, the gate is open again until the next result is sent.
    with anyio.fail_after(1):
        await gate.passed()


async def test_a_release_before_the_wait_is_not_lost() -> None:
    gate = FoldGate(bound_seconds=30.0)
    gate.close()
    gate.release()
    with anyio.fail_after(1):
        await gate.passed()


async def test_a_lost_release_costs_the_bound_and_is_logged() -> None:
    from structlog.testing import capture_logs

    gate = FoldGate(bound_seconds=0.05)
    gate.close()
    with capture_logs() as logs, anyio.fail_after(2):
        await gate.passed()
    assert [entry["event"] for entry in logs] == ["intake.fold_wait_expired"]
    with anyio.fail_after(1):
        await gate.passed()
