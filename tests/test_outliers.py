"""The outlier rule in the round machine: against earlier rounds, fixed per attempt, kept across restarts."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from test_machine import rules

from fl_orchestrator.core import events as ev
from fl_orchestrator.core.machine import RoundMachine
from fl_orchestrator.core.outliers import MIN_REFERENCE_NORMS, outlier_detail, reference_norm
from fl_orchestrator.core.reasons import Reason
from fl_orchestrator.core.records import DatasiteRecord

SITES = ("a@x.org", "b@x.org", "c@x.org", "d@x.org")


def _machine(**changes: object) -> RoundMachine:
    settings: dict[str, object] = {
        "datasites": SITES,
        "min_available_nodes": 4,
        "min_train_nodes": 3,
        "outlier_norm_factor": 10.0,
        "num_rounds": 5,
    }
    settings.update(changes)
    machine = RoundMachine(rules(**settings))
    machine.handle(ev.Started(0.0))
    for site in SITES:
        machine.handle(ev.NodeSeen(0.0, site))
    return machine


def _round(machine: RoundMachine, norms: dict[str, float], now: float) -> list[ev.Action]:
    """Every datasite answers with the given update norm; return every action."""
    assert machine.current is not None
    tasks, rnd = machine.current.tasks, machine.round
    actions: list[ev.Action] = []
    for site, norm in norms.items():
        result = ev.ResultReceived(now, site, rnd, tasks[site], True, 10, payload=site, update_norm=norm)
        actions += machine.handle(result)
    if machine.current is not None and machine.current.outstanding():
        actions += machine.handle(ev.Tick(machine.current.deadline))
    return actions


def _rejected(actions: list[ev.Action]) -> dict[str, Reason]:
    return {a.datasite: a.reason for a in actions if isinstance(a, ev.Reject)}


def test_round_one_has_no_reference_and_round_two_refuses_the_outlier() -> None:
    machine = _machine()
    first = _round(machine, {"a@x.org": 1.0, "b@x.org": 2.0, "c@x.org": 3.0, "d@x.org": 500.0}, 1.0)
    assert _rejected(first) == {}  # nothing to compare with yet
    machine.handle(ev.RoundAggregated(2.0, 1))
    assert machine.reference_norm == 2.5  # the median of 1, 2, 3 and 500
    second = _round(machine, {"a@x.org": 1.0, "b@x.org": 2.0, "c@x.org": 25.0, "d@x.org": 26.0}, 3.0)
    assert _rejected(second) == {"d@x.org": Reason.NORM_OUTLIER}  # 26 > 10 x 2.5; 25 is not
    refusal = next(a for a in second if isinstance(a, ev.Reject))
    assert "median" in refusal.detail


def test_the_reference_is_kept_in_checkpoints_so_a_restart_decides_the_same() -> None:
    machine = _machine()
    _round(machine, {"a@x.org": 1.0, "b@x.org": 1.0, "c@x.org": 1.0, "d@x.org": 1.0}, 1.0)
    snapshot = machine.records_snapshot()
    assert snapshot["a@x.org"]["last_update_norm"] == 1.0
    settings = rules(datasites=SITES, outlier_norm_factor=10.0)
    restarted = RoundMachine(settings, first_round=2, records=snapshot)
    assert reference_norm(restarted.records.values()) == 1.0


def test_off_when_the_factor_is_zero_or_norms_are_unknown() -> None:
    assert outlier_detail(1e9, 1.0, 0.0) is None
    assert outlier_detail(None, 1.0, 10.0) is None
    assert outlier_detail(1e9, None, 10.0) is None
    records = [DatasiteRecord(last_update_norm=1.0) for _ in range(MIN_REFERENCE_NORMS - 1)]
    assert reference_norm(records) is None


@given(
    st.lists(st.floats(0.0, 1e6), min_size=MIN_REFERENCE_NORMS, max_size=20),
    st.floats(0.0, 1e9),
    st.floats(0.5, 100.0),
)
def test_refused_exactly_when_over_the_factor_times_the_median(
    earlier: list[float], norm: float, factor: float
) -> None:
    reference = reference_norm([DatasiteRecord(last_update_norm=n) for n in earlier])
    assert reference is not None
    refused = outlier_detail(norm, reference, factor) is not None
    assert refused == (reference > 0 and norm > factor * reference)
