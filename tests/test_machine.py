"""The round state machine, driven by hand with a fake clock."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_orchestrator.core import events as ev
from fl_orchestrator.core.machine import Phase, RoundMachine, RoundRules, weighted_metrics
from fl_orchestrator.core.reasons import Reason
from fl_orchestrator.core.selection import sample_size, select_datasites, task_id

SITES = ("a@x.org", "b@x.org", "c@x.org", "d@x.org")


def rules(**overrides: object) -> RoundRules:
    base = RoundRules(
        run_id="run1",
        datasites=SITES,
        num_rounds=2,
        round_timeout_seconds=10.0,
        fraction_train=1.0,
        min_train_nodes=2,
        min_available_nodes=3,
        available_timeout_seconds=30.0,
        max_round_retries=1,
        presence_ttl_seconds=60.0,
        selection_seed=0,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def seen_all(machine: RoundMachine, now: float, sites: tuple[str, ...] = SITES) -> list[ev.Action]:
    actions: list[ev.Action] = []
    for site in sites:
        actions += machine.handle(ev.NodeSeen(now, site))
    return actions


def only(actions: list[ev.Action], kind: type) -> list:  # type: ignore[type-arg]
    return [a for a in actions if isinstance(a, kind)]


def result(machine: RoundMachine, now: float, site: str, *, ok: bool = True, n: int = 10, **kw: object):  # type: ignore[no-untyped-def]
    assert machine.current is not None
    fields: dict[str, object] = {
        "now": now,
        "datasite": site,
        "round": machine.round,
        "reply_to": machine.current.tasks.get(site),
        "ok": ok,
        "num_examples": n if ok else 0,
        "payload": site,
    }
    fields.update(kw)
    return machine.handle(ev.ResultReceived(**fields))  # type: ignore[arg-type]


def started(r: RoundRules, now: float = 0.0) -> tuple[RoundMachine, ev.Dispatch]:
    machine = RoundMachine(r)
    seen_all(machine, now)
    actions = machine.handle(ev.Started(now))
    dispatch = only(actions, ev.Dispatch)
    assert len(dispatch) == 1
    return machine, dispatch[0]


def test_waits_for_nodes_then_dispatches_when_enough_are_seen() -> None:
    machine = RoundMachine(rules())
    actions = machine.handle(ev.Started(0.0))
    (wait,) = only(actions, ev.AwaitNodes)
    assert wait.missing == SITES and wait.until == 30.0
    assert machine.phase == Phase.WAITING_FOR_NODES
    assert machine.next_wakeup() == 30.0
    assert machine.handle(ev.NodeSeen(1.0, "a@x.org")) == [ev.AwaitNodes(1, ("a@x.org",), SITES[1:], 3, 30.0)]
    machine.handle(ev.NodeSeen(2.0, "b@x.org"))
    actions = machine.handle(ev.NodeSeen(3.0, "c@x.org"))
    (dispatch,) = only(actions, ev.Dispatch)
    assert set(dispatch.tasks) == {"a@x.org", "b@x.org", "c@x.org"}
    assert dispatch.deadline == 13.0 and dispatch.round == 1 and dispatch.attempt == 1
    assert machine.phase == Phase.TRAINING and machine.next_wakeup() == 13.0


def test_heartbeats_read_together_all_count_before_the_round_starts() -> None:
    # One scan finds all four: fed one by one, the round would start with the first one that
    # met min_available_nodes (1 here) and leave out three datasites present all along.
    machine = RoundMachine(rules(min_available_nodes=1, min_train_nodes=1))
    machine.handle(ev.Started(0.0))
    batch = ev.NodesSeen(
        2.0, tuple(ev.NodeSeen(2.0, site, seen_at=1.5) for site in (*SITES, "stranger@x.org"))
    )
    (dispatch,) = only(machine.handle(batch), ev.Dispatch)
    assert set(dispatch.tasks) == set(SITES) and dispatch.deadline == 12.0
    assert machine.records["a@x.org"].last_seen == 1.5
    # Outside the waiting phase a batch only records presence.
    assert machine.handle(ev.NodesSeen(3.0, (ev.NodeSeen(3.0, "a@x.org"),))) == []
    assert machine.records["a@x.org"].last_seen == 3.0


def test_unknown_heartbeats_are_ignored() -> None:
    machine = RoundMachine(rules())
    machine.handle(ev.Started(0.0))
    assert machine.handle(ev.NodeSeen(1.0, "stranger@x.org")) == []
    assert machine.available(1.0) == ()


def test_available_timeout_fails_the_job_naming_who_is_missing() -> None:
    machine = RoundMachine(rules())
    machine.handle(ev.Started(0.0))
    machine.handle(ev.NodeSeen(1.0, "a@x.org"))
    assert machine.handle(ev.Tick(29.9)) == []
    (failed,) = machine.handle(ev.Tick(30.0))
    assert isinstance(failed, ev.JobFailed)
    assert "b@x.org, c@x.org, d@x.org" in failed.reason and "1 of 3" in failed.reason
    assert machine.phase == Phase.FAILED and machine.next_wakeup() is None


def test_presence_expires_after_the_ttl() -> None:
    machine = RoundMachine(rules(presence_ttl_seconds=5.0))
    seen_all(machine, 0.0)
    assert len(machine.available(5.0)) == 4
    assert machine.available(5.1) == ()
    actions = machine.handle(ev.Started(6.0))
    assert only(actions, ev.AwaitNodes) and not only(actions, ev.Dispatch)


def test_all_answers_close_the_round_early_and_aggregate() -> None:
    machine, dispatch = started(rules())
    sites = sorted(dispatch.tasks)
    for i, site in enumerate(sites[:-1]):
        actions = result(machine, 1.0 + i, site, n=10 * (i + 1))
        assert [type(a) for a in actions] == [ev.Accept]
    actions = result(machine, 5.0, sites[-1], ok=False, error_type="ValueError", error_message="boom")
    assert isinstance(actions[0], ev.RecordFailure)
    (aggregate,) = only(actions, ev.Aggregate)
    summary = aggregate.summary
    assert summary.closed_at == 5.0 and summary.timed_out == ()
    assert summary.failed == {sites[-1]: "ValueError"}
    assert set(summary.succeeded) == set(sites[:-1])
    assert machine.phase == Phase.AGGREGATING and machine.next_wakeup() is None


def test_timeout_aggregates_the_partial_set_and_counts_stragglers() -> None:
    machine, dispatch = started(rules())
    sites = sorted(dispatch.tasks)
    result(machine, 1.0, sites[0])
    result(machine, 2.0, sites[1])
    assert machine.handle(ev.Tick(9.99)) == []
    (aggregate,) = only(machine.handle(ev.Tick(10.0)), ev.Aggregate)
    assert set(aggregate.summary.timed_out) == set(sites[2:])
    for site in sites[2:]:
        assert machine.records[site].timed_out == 1
    assert machine.records[sites[0]].succeeded == 1
    assert aggregate.summary.train_seconds == {sites[0]: 1.0, sites[1]: 2.0}


def test_late_result_after_close_is_rejected_as_round_closed() -> None:
    machine, dispatch = started(rules())
    sites = sorted(dispatch.tasks)
    result(machine, 1.0, sites[0])
    result(machine, 1.0, sites[1])
    machine.handle(ev.Tick(10.0))
    (reject,) = result_late(machine, sites[2], dispatch)
    assert reject.reason == Reason.ROUND_CLOSED
    machine.handle(ev.RoundAggregated(11.0, 1))
    (reject,) = result_late(machine, sites[2], dispatch)
    assert reject.reason == Reason.ROUND_CLOSED


def result_late(machine: RoundMachine, site: str, dispatch: ev.Dispatch) -> list[ev.Action]:
    return machine.handle(
        ev.ResultReceived(12.0, site, dispatch.round, dispatch.tasks[site], True, 5, payload="late")
    )


def test_duplicates_wrong_reply_to_unselected_and_unknown_sites_are_rejected() -> None:
    machine, dispatch = started(rules(fraction_train=0.5, min_train_nodes=2))
    chosen = sorted(dispatch.tasks)
    assert len(chosen) == 2
    outsider = next(s for s in SITES if s not in chosen)
    (reject,) = machine.handle(ev.ResultReceived(1.0, "evil@x.org", 1, "x", True, 1, payload="p"))
    assert reject.reason == Reason.UNKNOWN_DATASITE
    (reject,) = machine.handle(ev.ResultReceived(1.0, outsider, 1, "x", True, 1, payload="p"))
    assert reject.reason == Reason.NOT_SELECTED
    (reject,) = result(machine, 1.0, chosen[0], reply_to="not-the-task")
    assert reject.reason == Reason.REPLY_TO_MISMATCH
    assert only(result(machine, 1.0, chosen[0]), ev.Accept)
    (reject,) = result(machine, 1.5, chosen[0])
    assert reject.reason == Reason.DUPLICATE
    (reject,) = result(machine, 1.5, chosen[1], round=2)
    assert reject.reason == Reason.UNKNOWN_ROUND
    assert machine.records[chosen[0]].rejected == 2
    assert machine.records[chosen[0]].succeeded == 1


def test_quorum_failure_retries_then_fails_the_job() -> None:
    machine, dispatch = started(rules(max_round_retries=1))
    sites = sorted(dispatch.tasks)
    result(machine, 1.0, sites[0])
    actions = machine.handle(ev.Tick(10.0))
    (abandon,) = only(actions, ev.AbandonAttempt)
    assert abandon.retry and abandon.summary.attempt == 1
    (retry,) = only(actions, ev.Dispatch)
    assert retry.round == 1 and retry.attempt == 2 and retry.deadline == 20.0
    assert set(retry.tasks.values()).isdisjoint(dispatch.tasks.values())
    # The first attempt's answers are stale now.
    (stale,) = machine.handle(
        ev.ResultReceived(11.0, sites[1], 1, dispatch.tasks[sites[1]], True, 3, payload=1)
    )
    assert stale.reason == Reason.REPLY_TO_MISMATCH
    actions = machine.handle(ev.Tick(20.0))
    (abandon,) = only(actions, ev.AbandonAttempt)
    assert not abandon.retry
    (failed,) = only(actions, ev.JobFailed)
    assert "no retries left" in failed.reason
    assert machine.phase == Phase.FAILED


def test_round_that_cannot_reach_quorum_is_abandoned_without_waiting() -> None:
    machine, dispatch = started(rules(min_available_nodes=2, min_train_nodes=2, fraction_train=0.5))
    sites = sorted(dispatch.tasks)
    assert len(sites) == 2
    actions = result(machine, 1.0, sites[0], ok=False, error_type="E", error_message="m")
    assert only(actions, ev.AbandonAttempt) and only(actions, ev.Dispatch)


def test_full_job_runs_every_round_then_finishes() -> None:
    machine, _dispatch = started(rules(num_rounds=2))
    now = 0.0
    for rnd in (1, 2):
        assert machine.round == rnd
        assert machine.current is not None
        for site in sorted(machine.current.tasks):
            now += 1
            result(machine, now, site)
        assert machine.phase == Phase.AGGREGATING
        actions = machine.handle(ev.RoundAggregated(now, rnd))
        if rnd == 1:
            assert only(actions, ev.Dispatch)[0].round == 2
    assert actions == [ev.JobFinished(2)]
    assert machine.phase == Phase.DONE
    assert machine.handle(ev.Tick(1e9)) == []


def test_aggregation_failure_fails_the_job() -> None:
    machine, dispatch = started(rules())
    for site in sorted(dispatch.tasks):
        result(machine, 1.0, site)
    (failed,) = machine.handle(ev.AggregationFailed(2.0, 1, "MemoryError"))
    assert isinstance(failed, ev.JobFailed) and "MemoryError" in failed.reason


def test_resuming_past_the_last_round_finishes_at_once() -> None:
    machine = RoundMachine(rules(num_rounds=3), first_round=4)
    assert machine.handle(ev.Started(0.0)) == [ev.JobFinished(3)]


def test_weighted_metrics_weight_by_num_examples_and_skip_missing_keys() -> None:
    merged = weighted_metrics({"a": {"loss": 1.0, "acc": 0.5}, "b": {"loss": 3.0}}, {"a": 10, "b": 30})
    assert merged == {"acc": 0.5, "loss": pytest.approx(2.5)}


def test_selection_is_seeded_sized_like_flower_and_ids_are_stable() -> None:
    assert sample_size(10, 0.5, 2) == 5
    assert sample_size(10, 0.05, 2) == 2
    assert sample_size(3, 0.5, 5) == 3
    first = select_datasites(SITES, fraction=0.5, minimum=1, seed=3, rnd=1, attempt=1)
    again = select_datasites(reversed(SITES), fraction=0.5, minimum=1, seed=3, rnd=1, attempt=1)
    assert first == again and len(first) == 2
    rounds = {select_datasites(SITES, fraction=0.5, minimum=1, seed=3, rnd=r, attempt=1) for r in range(20)}
    assert len(rounds) > 1
    assert task_id("r", 1, 1, "a@x.org") == task_id("r", 1, 1, "a@x.org")
    assert task_id("r", 1, 1, "a@x.org") != task_id("r", 1, 2, "a@x.org")


outcomes = st.lists(
    st.tuples(st.sampled_from(SITES), st.sampled_from(["ok", "fail", "dup", "stale"]), st.floats(0, 12)),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(outcomes)
def test_accounting_invariants_hold_for_any_event_order(script: list[tuple[str, str, float]]) -> None:
    machine, dispatch = started(rules(num_rounds=1, max_round_retries=0))
    accepted: list[str] = []
    summaries: list[ev.RoundSummary] = []
    closed = False
    for site, kind, at in sorted(script, key=lambda item: item[2]):
        if machine.phase != Phase.TRAINING:
            break
        if kind == "stale":
            actions = machine.handle(ev.ResultReceived(at, site, 0, "old", True, 1, payload=site))
        else:
            ok = kind != "fail"
            actions = machine.handle(
                ev.ResultReceived(at, site, 1, dispatch.tasks.get(site), ok, 5 if ok else 0, payload=site)
            )
        accepted += [a.datasite for a in only(actions, ev.Accept)]
        summaries += [a.summary for a in actions if isinstance(a, (ev.Aggregate, ev.AbandonAttempt))]
        if machine.current is not None:  # the O(1) count the machine closes on agrees with the set
            assert machine.current.outstanding_count() == len(machine.current.outstanding())
        closed = closed or bool(only(actions, ev.Aggregate) or only(actions, ev.JobFailed))
    if not closed:
        actions = machine.handle(ev.Tick(100.0))
        summaries += [a.summary for a in actions if isinstance(a, (ev.Aggregate, ev.AbandonAttempt))]
    # Each datasite is accepted at most once; every selected one is counted exactly once.
    assert len(accepted) == len(set(accepted))
    summary = summaries[-1]
    buckets = [*summary.succeeded, *summary.failed, *summary.timed_out]
    assert sorted(buckets) == sorted(summary.selected)
    assert set(accepted) == set(summary.succeeded)
    assert machine.phase in (Phase.AGGREGATING, Phase.FAILED)
    assert (machine.phase == Phase.AGGREGATING) == (len(summary.succeeded) >= 2)


def aggregated(machine: RoundMachine, now: float) -> list[ev.Action]:
    assert machine.current is not None
    for site in sorted(machine.current.tasks):
        result(machine, now, site)
    return machine.handle(ev.RoundAggregated(now, machine.round))


def eval_result(
    machine: RoundMachine, now: float, site: str, *, n: int = 10, ok: bool = True, **kw: object
) -> list:  # type: ignore[type-arg]
    assert machine.evaluation is not None
    fields: dict[str, object] = {
        "now": now,
        "datasite": site,
        "round": machine.evaluation.round,
        "reply_to": machine.evaluation.tasks.get(site),
        "ok": ok,
        "num_examples": n,
        "metrics": {"accuracy": n / 100},
        "purpose": "evaluate",
    }
    fields.update(kw)
    return machine.handle(ev.ResultReceived(**fields))  # type: ignore[arg-type]


def test_federated_evaluation_runs_after_aggregation_and_weights_metrics() -> None:
    machine, _ = started(rules(num_rounds=2, fraction_evaluate=0.5, min_evaluate_nodes=2))
    (dispatch,) = aggregated(machine, 1.0)
    assert isinstance(dispatch, ev.Dispatch) and dispatch.purpose == "evaluate"
    assert dispatch.round == 1 and dispatch.attempt == 0 and len(dispatch.tasks) == 2
    assert machine.phase == Phase.EVALUATING and machine.next_wakeup() == 11.0
    first, second = sorted(dispatch.tasks)
    # A late training answer for the same round is refused while evaluating.
    (late,) = machine.handle(ev.ResultReceived(2.0, first, 1, "x", True, 5, payload="p"))
    assert late.reason == Reason.ROUND_CLOSED
    assert eval_result(machine, 2.0, first, n=10) == []
    (dup,) = eval_result(machine, 2.5, first, n=10)
    assert dup.reason == Reason.DUPLICATE
    done, next_dispatch = eval_result(machine, 3.0, second, n=30)
    assert isinstance(done, ev.EvaluationDone)
    assert done.metrics["accuracy"] == pytest.approx((10 * 0.1 + 30 * 0.3) / 40)
    assert done.num_examples == 40 and done.timed_out == () and done.seconds == 2.0
    assert (
        isinstance(next_dispatch, ev.Dispatch)
        and next_dispatch.round == 2
        and next_dispatch.purpose == "train"
    )


def test_federated_evaluation_times_out_and_is_skipped_when_too_few_are_present() -> None:
    machine, _ = started(rules(num_rounds=3, fraction_evaluate=1.0, min_evaluate_nodes=2))
    (dispatch,) = aggregated(machine, 1.0)
    one = sorted(dispatch.tasks)[0]
    eval_result(machine, 2.0, one)
    done, _next = machine.handle(ev.Tick(11.0))
    assert isinstance(done, ev.EvaluationDone) and len(done.timed_out) == len(dispatch.tasks) - 1
    assert machine.round == 2 and machine.phase == Phase.TRAINING


def test_federated_evaluation_is_skipped_when_too_few_are_present() -> None:
    r = rules(
        min_available_nodes=1,
        min_train_nodes=1,
        fraction_train=0.25,
        presence_ttl_seconds=5.0,
        fraction_evaluate=1.0,
        min_evaluate_nodes=3,
    )
    machine, dispatch = started(r)
    (site,) = dispatch.tasks
    result(machine, 10.0, site)  # only this one has been seen in the last 5 s
    actions = machine.handle(ev.RoundAggregated(10.0, 1))
    (skipped,) = only(actions, ev.EvaluationSkipped)
    assert "min_evaluate_nodes (3)" in skipped.reason
    assert machine.round == 2


def test_evaluation_results_outside_an_evaluation_are_refused() -> None:
    machine, dispatch = started(rules(fraction_evaluate=1.0))
    site = sorted(dispatch.tasks)[0]
    (reject,) = machine.handle(
        ev.ResultReceived(1.0, site, 1, "whatever", True, 3, purpose="evaluate", payload="p")
    )
    assert reject.reason == Reason.ROUND_CLOSED


@pytest.mark.parametrize("gone", [False, True])
def test_a_datasite_that_timed_out_is_unavailable_until_seen_again_only_where_presence_is_synthetic(
    gone: bool,
) -> None:
    # syft-flwr owners are "present" while a schema file exists: only an answer proves life.
    machine, dispatch = started(rules(min_train_nodes=2, timeout_means_gone=gone))
    silent = SITES[2]
    for site in SITES[:2]:
        result(machine, 1.0, site)
    machine.handle(ev.Tick(10.0))  # the silent one times out; the round aggregates
    assert silent in dispatch.tasks
    assert (silent in machine.available(10.5)) is not gone
    if gone:
        machine.handle(ev.NodeSeen(11.0, silent))
        assert silent in machine.available(11.0)


def test_a_stale_heartbeat_marks_presence_but_the_deadline_comes_from_the_clock() -> None:
    machine = RoundMachine(rules(datasites=("a@x.org",), min_available_nodes=1, min_train_nodes=1))
    machine.handle(ev.Started(1000.0))
    # Written 60 s before the daemon read it (before a restart), within the presence TTL.
    (dispatch,) = machine.handle(ev.NodeSeen(1000.0, "a@x.org", seen_at=940.0))
    assert isinstance(dispatch, ev.Dispatch)
    assert dispatch.deadline == 1010.0  # now + round_timeout, never the heartbeat's age
    assert machine.records["a@x.org"].last_seen == 940.0
    # A heartbeat stamped in the future (a skewed clock) counts as now, never later.
    machine.handle(ev.NodeSeen(1001.0, "a@x.org", seen_at=5000.0))
    assert machine.records["a@x.org"].last_seen == 1001.0


def test_the_runners_own_train_time_is_kept_apart_from_dispatch_to_result() -> None:
    machine, _ = started(rules(min_available_nodes=2))
    result(machine, 4.0, "a@x.org", runner_seconds=1.5)
    result(machine, 6.0, "b@x.org")  # a runner that does not say (syft-flwr owners)
    a, b = machine.records["a@x.org"], machine.records["b@x.org"]
    assert (a.train_seconds_total, a.runner_train_seconds_total, a.runner_timed) == (4.0, 1.5, 1)
    assert (b.train_seconds_total, b.runner_train_seconds_total, b.runner_timed) == (6.0, 0.0, 0)
