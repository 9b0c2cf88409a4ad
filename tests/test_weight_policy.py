"""No single datasite owns the aggregate by claiming weight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_machine import rules

from fl_orchestrator.aggregation.weights import as_num_examples, capped_weights
from fl_orchestrator.core import events as ev
from fl_orchestrator.core.machine import RoundMachine
from fl_orchestrator.core.reasons import Reason

from support import scripted

POISON = 100.0


@given(
    st.lists(st.floats(0.001, 1e12), min_size=1, max_size=12),
    st.floats(0.01, 0.99),
)
def test_no_capped_weight_is_over_its_share_and_the_others_keep_their_ratios(
    weights: list[float], share: float
) -> None:
    capped = capped_weights(weights, share)
    total = sum(capped)
    if share * len(weights) <= 1 and max(weights) > share * sum(weights):
        assert capped == [1.0] * len(weights)
        return
    assert max(capped) <= share * total * (1 + 1e-9)
    kept = [(w, c) for w, c in zip(weights, capped, strict=True) if c == w]
    assert all(c <= w for w, c in zip(weights, capped, strict=True))
    assert len(kept) >= 1
    ints = as_num_examples(capped)
    assert all(isinstance(i, int) and i >= 1 for i in ints)
    top = max(capped)
    assert all(abs(i / 2**40 - c / top) < 1e-9 for i, c in zip(ints, capped, strict=True))


def test_capping_by_hand() -> None:
    # 10, 20, 30 and a claim of 1e12, at most half the total each: the big one gets 60.
    assert capped_weights([10, 20, 30, 1e12], 0.5) == [10, 20, 30, 60]
    assert capped_weights([10, 20, 30], 0.9) == [10, 20, 30]  # nobody over the share
    assert capped_weights([1, 1e9], 0.4) == [1.0, 1.0]  # two results cannot each be under 40 %


def test_a_claim_that_jumps_over_its_first_claim_is_refused() -> None:
    machine = RoundMachine(
        rules(datasites=("a@x.org",), min_available_nodes=1, min_train_nodes=1, max_num_examples_growth=4.0)
    )
    machine.handle(ev.Started(0.0))
    (first,) = machine.handle(ev.NodeSeen(0.0, "a@x.org"))
    assert isinstance(first, ev.Dispatch)
    machine.handle(ev.ResultReceived(1.0, "a@x.org", 1, first.tasks["a@x.org"], True, 10, payload="a"))
    (second,) = [a for a in machine.handle(ev.RoundAggregated(2.0, 1)) if isinstance(a, ev.Dispatch)]
    task = second.tasks["a@x.org"]
    (refusal,) = machine.handle(ev.ResultReceived(3.0, "a@x.org", 2, task, True, 41, payload="a"))
    assert isinstance(refusal, ev.Reject) and refusal.reason == Reason.NUM_EXAMPLES_JUMP
    accepted = machine.handle(ev.ResultReceived(3.5, "a@x.org", 2, task, True, 40, payload="a"))
    assert isinstance(accepted[0], ev.Accept)  # 4 x its first claim is still fine
    # The first claim is part of the accounting a checkpoint keeps.
    assert machine.records_snapshot()["a@x.org"]["first_num_examples"] == 10


def _attacker(claims: dict[int, int]) -> Any:
    def train(arrays: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
        claim = claims.get(config["server-round"], 20)
        return {k: v + np.float32(POISON) for k, v in arrays.items()}, claim, {}

    return train


def _fedavg(model: dict[str, np.ndarray], with_attacker: bool, weight: int = 20) -> dict[str, np.ndarray]:
    """One round by hand: the three honest scripted datasites, plus the attacker at ``weight``."""
    if not with_attacker:
        return scripted.expected_fedavg(model, [0, 1, 2])
    total = sum(scripted.num_examples_of(i) for i in range(3)) + weight
    out = {}
    for name, value in model.items():
        acc = sum(
            scripted.scripted_update(model, i)[name].astype(np.float64) * scripted.num_examples_of(i)
            for i in range(3)
        )
        acc = acc + (value.astype(np.float64) + POISON) * weight
        out[name] = (acc / total).astype(value.dtype)
    return out


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2) for k in a)))


@pytest.mark.anyio
@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "claims", "rounds"),
    [("from_round_1", {1: 10**12, 2: 10**12}, 2), ("from_round_3", {3: 10**12}, 3)],
)
async def test_a_datasite_claiming_10_to_the_12_moves_the_model_no_more_than_an_equal_weight_attacker(
    tmp_path: Path, name: str, claims: dict[int, int], rounds: int
) -> None:
    from test_daemon import run_federation, scripted_train

    from fl_orchestrator.config import load_config
    from fl_orchestrator.daemon.lifecycle import EXIT_DONE
    from fl_orchestrator.storage.models import initial_model

    from support.jobs import job_table, write_job

    distances = {}
    for defaults in ("before", "after"):
        before = {"max_num_examples": 10**12, "max_num_examples_growth": 0.0, "outlier_norm_factor": 0.0}
        limits = before if defaults == "before" else {}
        table = job_table(
            4, job={"num_rounds": rounds, "min_train_nodes": 3, "round_timeout_seconds": 1.5}, limits=limits
        )
        job = write_job(tmp_path / defaults, table)
        daemon = await run_federation(job, [*(scripted_train(i) for i in range(3)), _attacker(claims)])
        assert daemon.exit_code == EXIT_DONE
        start = initial_model(load_config(job).model)
        honest, equal = start, start
        for _ in range(rounds):
            honest = _fedavg(honest, with_attacker=False)
            equal = _fedavg(equal, with_attacker=True)
        distances[defaults] = _distance(daemon.store.load(rounds), honest)
        limit = _distance(equal, honest)
    print(f"\n{name}: distance from the honest-only model: {distances}, equal-weight attacker: {limit:.4g}")
    assert distances["after"] <= limit
    assert distances["before"] > 2 * limit  # what the defaults used to allow: a takeover


@pytest.mark.anyio
@pytest.mark.integration
async def test_max_weight_share_caps_a_heavy_claim_end_to_end(tmp_path: Path) -> None:
    from test_daemon import run_federation, scripted_train

    from fl_orchestrator.config import load_config
    from fl_orchestrator.daemon.lifecycle import EXIT_DONE
    from fl_orchestrator.storage.models import initial_model

    from support.jobs import job_table, write_job

    table = job_table(4, job={"num_rounds": 1, "min_train_nodes": 4}, limits={"max_weight_share": 0.5})
    job = write_job(tmp_path, table)
    heavy = _attacker({1: 10**8})  # within max_num_examples, and its first claim
    daemon = await run_federation(job, [*(scripted_train(i) for i in range(3)), heavy])
    assert daemon.exit_code == EXIT_DONE
    model = initial_model(load_config(job).model)
    # Weights 10, 20, 30 and 1e8 capped to half the total: 60 (test_capping_by_hand).
    want = _fedavg(model, with_attacker=True, weight=60)
    got = daemon.store.load(1)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6)
