"""A finite update can still overflow a float64 sum: such a result is refused, and no aggregate
that is not finite is ever published."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_orchestrator.aggregation.base import RoundSkipped
from fl_orchestrator.aggregation.guard import (
    FLOAT64_MAX,
    finish_finite,
    largest_magnitude,
    magnitude_limit,
)
from fl_orchestrator.aggregation.registry import build_strategy
from fl_orchestrator.config.schema import LimitsSection
from fl_orchestrator.core.reasons import Reason, Rejection
from fl_orchestrator.intake.reader import InboundReader
from fl_orchestrator.wire.layout import JobLayout
from fl_orchestrator.wire.messages import Envelope, ResultMessage, encode_result_frames, model_spec

MODEL = {"w": np.zeros((3, 2), dtype=np.float64), "b": np.zeros(2, dtype=np.float32)}
SITES = frozenset({"a@x.org", "b@x.org", "c@x.org", "d@x.org"})


def reader(tmp_path: Path) -> InboundReader:
    layout = JobLayout(tmp_path, "job", "agg@x.org")
    return InboundReader(layout, SITES, model_spec(MODEL), LimitsSection(), global_model=MODEL)


def result_bytes(w: np.ndarray, num_examples: int) -> bytes:
    message = ResultMessage(
        Envelope("job", 1, "m1", "t1", 1.0, None), True, num_examples, {}, arrays={"w": w, "b": MODEL["b"]}
    )
    return b"".join(bytes(memoryview(f)) for f in encode_result_frames(message))


def test_a_float64_update_that_could_overflow_the_sum_is_refused(tmp_path: Path) -> None:
    edge = reader(tmp_path)
    huge = np.full((3, 2), 1e308)
    with pytest.raises(Rejection) as info:
        edge.check_result(result_bytes(huge, 1), "t1")
    assert info.value.reason == Reason.OVERFLOW
    # The limit scales with the claimed weight and the number of datasites.
    big = np.full((3, 2), FLOAT64_MAX / 8)
    edge.check_result(result_bytes(big, 1), "t1")  # 4 datasites x 1 example: fits
    with pytest.raises(Rejection):
        edge.check_result(result_bytes(big, 2), "t1")


def test_the_magnitude_limit_keeps_any_round_sum_finite() -> None:
    limit = magnitude_limit(10**12, 4)
    near = np.nextafter(limit, 0.0)
    total = np.float64(0.0)
    with np.errstate(over="raise"):
        for _ in range(4):
            total += np.float64(near) * np.float64(10**12)
    assert math.isfinite(float(total))
    assert largest_magnitude({"x": np.array([1.0, -3.0]), "y": np.array([1e30], dtype=np.float32)}) == 3.0


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedmedian"]),
    hostile=st.lists(st.tuples(st.lists(finite, min_size=6, max_size=6), st.integers(1, 10**12)), max_size=4),
)
def test_no_sequence_of_results_from_one_datasite_makes_the_model_non_finite(
    name: str, hostile: list[tuple[list[float], int]]
) -> None:
    strategy = build_strategy(name)
    model: dict[str, Any] = {"w": np.zeros(6, dtype=np.float64)}
    for rnd, (values, weight) in enumerate(hostile, start=1):
        strategy.begin_round(rnd, model)
        honest = [{"w": np.full(6, 0.5 * (i + 1))} for i in range(3)]
        updates: list[Any] = list(honest)
        weights = [10, 20, 30]
        update = {"w": np.array(values)}
        if largest_magnitude(update) < magnitude_limit(weight, 4):  # what the intake lets through
            updates.append(update)
            weights.append(weight)
        if strategy.streaming:
            for u, n in zip(updates, weights, strict=True):
                strategy.fold(u, n)
        else:
            strategy.aggregate_all(updates, weights)
        with contextlib.suppress(RoundSkipped):  # skipped: the model is unchanged, as the daemon does
            model = finish_finite(strategy)
        assert np.isfinite(model["w"]).all()
        assert all(np.isfinite(v).all() for v in _arrays(strategy.state_dict()))


def _arrays(state: Any) -> list[np.ndarray]:
    if isinstance(state, np.ndarray):
        return [state] if state.dtype.kind == "f" else []
    if isinstance(state, dict):
        return [a for v in state.values() for a in _arrays(v)]
    if isinstance(state, (list, tuple)):
        return [a for v in state for a in _arrays(v)]
    return []


def test_a_non_finite_aggregate_is_not_published_and_the_strategy_state_is_put_back() -> None:
    strategy = build_strategy("fedadam")
    model = {"w": np.zeros(2)}
    strategy.begin_round(1, model)
    strategy.fold({"w": np.array([1.0, 1.0])}, 1)
    strategy.finish()
    state = strategy.state_dict()
    strategy.begin_round(2, model)
    strategy.fold({"w": np.array([1e200, 1.0])}, 1)  # finite, but its square is not
    with pytest.raises(RoundSkipped, match="not finite"):
        finish_finite(strategy)
    after = strategy.state_dict()
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(state), _arrays(after), strict=True))


@pytest.mark.anyio
@pytest.mark.integration
async def test_a_datasite_sending_1e308_is_refused_and_the_job_ends_with_the_honest_model(
    tmp_path: Path,
) -> None:
    from test_daemon import run_federation, scripted_train

    from fl_orchestrator.config import load_config
    from fl_orchestrator.daemon.lifecycle import EXIT_DONE
    from fl_orchestrator.storage.models import initial_model

    from support import scripted
    from support.jobs import job_table, write_job
    from support.records import quarantine_records

    table = job_table(
        4,
        job={"num_rounds": 2, "min_train_nodes": 3, "round_timeout_seconds": 1.5},
        model={"arrays": {"w": {"shape": [4, 3], "init": "normal", "scale": 1.0, "dtype": "float64"}}},
    )
    job = write_job(tmp_path, table)

    def overflowing(arrays: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
        return {k: np.full(v.shape, 1e308) for k, v in arrays.items()}, 10, {}

    daemon = await run_federation(job, [*(scripted_train(i) for i in range(3)), overflowing])
    assert daemon.exit_code == EXIT_DONE
    config = load_config(job)
    want = initial_model(config.model)
    for rnd in (1, 2):
        want = scripted.expected_fedavg(want, [0, 1, 2])
        got = daemon.store.load(rnd)
        assert np.allclose(got["w"], want["w"], rtol=1e-12), rnd
    reasons = [r["reason"] for r in quarantine_records(config.state.state_dir)]
    assert reasons.count("overflow") == 2
