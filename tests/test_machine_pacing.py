"""A region's round machine, paced by its root job (docs/TIERS.md), with a fake clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_machine import SITES, only, result, rules, seen_all

from fl_orchestrator.core import events as ev
from fl_orchestrator.core.machine import Phase, RoundMachine

MARGIN = 5.0


def region(**overrides: object) -> RoundMachine:
    values: dict[str, object] = {"paced_by_root": True, "root_margin_seconds": MARGIN, "num_rounds": 10}
    values.update(overrides)
    machine = RoundMachine(rules(**values))
    seen_all(machine, 0.0)
    return machine


def finish_round(machine: RoundMachine, now: float) -> list[ev.Action]:
    actions: list[ev.Action] = []
    for site in SITES:
        actions += result(machine, now, site)
    assert only(actions, ev.Aggregate)
    return machine.handle(ev.RoundAggregated(now, machine.round))


def test_a_region_waits_for_its_root_before_its_first_round() -> None:
    machine = region()
    actions = machine.handle(ev.Started(1.0))
    assert actions == [ev.AwaitRoot(1)]
    assert machine.phase == Phase.AWAITING_ROOT
    assert machine.next_wakeup() is None  # the root may take its time: nothing times out here
    dispatched = only(machine.handle(ev.RootTask(2.0, 1, deadline=100.0)), ev.Dispatch)
    assert dispatched and dispatched[0].round == 1
    assert dispatched[0].deadline == 2.0 + 10.0  # the region's own timeout comes first here


def test_the_roots_deadline_less_the_margin_caps_the_regions_round() -> None:
    machine = region()
    machine.handle(ev.Started(1.0))
    dispatched = only(machine.handle(ev.RootTask(2.0, 1, deadline=9.0)), ev.Dispatch)
    assert dispatched[0].deadline == 9.0 - MARGIN


def test_after_a_round_the_region_waits_for_the_roots_next_task() -> None:
    machine = region()
    machine.handle(ev.Started(1.0))
    machine.handle(ev.RootTask(2.0, 1, deadline=100.0))
    assert finish_round(machine, 3.0) == [ev.AwaitRoot(2)]
    assert machine.phase == Phase.AWAITING_ROOT


def test_a_failed_round_is_reported_to_the_root_and_the_region_goes_on() -> None:
    machine = region(max_round_retries=0)
    machine.handle(ev.Started(1.0))
    machine.handle(ev.RootTask(2.0, 1, deadline=100.0))
    actions = machine.handle(ev.Tick(2.0 + 10.0))  # nobody answered
    failed = only(actions, ev.RootRoundFailed)
    assert failed and failed[0].round == 1
    assert not only(actions, ev.JobFailed)
    assert actions[-1] == ev.AwaitRoot(2)
    assert machine.phase == Phase.AWAITING_ROOT


def test_no_retry_starts_when_the_roots_deadline_has_passed() -> None:
    machine = region(max_round_retries=3)
    machine.handle(ev.Started(1.0))
    machine.handle(ev.RootTask(2.0, 1, deadline=12.0))
    actions = machine.handle(ev.Tick(7.0))  # the capped deadline: 12 - 5
    assert only(actions, ev.RootRoundFailed)
    assert not only(actions, ev.Dispatch)


def test_rounds_the_root_did_not_ask_this_region_for_are_skipped() -> None:
    machine = region()
    machine.handle(ev.Started(1.0))
    machine.handle(ev.RootTask(2.0, 1, deadline=100.0))
    finish_round(machine, 3.0)
    dispatched = only(machine.handle(ev.RootTask(4.0, 4, deadline=100.0)), ev.Dispatch)
    assert dispatched[0].round == 4 and machine.round == 4


def test_a_task_that_arrives_while_a_round_runs_opens_the_next_round_after_it() -> None:
    machine = region()
    machine.handle(ev.Started(1.0))
    machine.handle(ev.RootTask(2.0, 1, deadline=100.0))
    assert machine.handle(ev.RootTask(2.5, 2, deadline=100.0)) == []
    assert machine.round == 1 and machine.phase == Phase.TRAINING
    opened = only(finish_round(machine, 3.0), ev.Dispatch)
    assert opened and opened[0].round == 2


def test_the_roots_end_finishes_the_region() -> None:
    machine = region()
    machine.handle(ev.Started(1.0))
    machine.handle(ev.RootTask(2.0, 1, deadline=100.0))
    finish_round(machine, 3.0)
    assert machine.handle(ev.RootEnded(4.0)) == [ev.JobFinished(1)]
    assert machine.phase == Phase.DONE


def test_a_flat_job_ignores_root_events() -> None:
    machine = RoundMachine(rules())
    seen_all(machine, 0.0)
    machine.handle(ev.Started(1.0))
    assert machine.phase == Phase.TRAINING
    assert machine.handle(ev.RootTask(2.0, 5, deadline=3.0)) == []
    assert machine.handle(ev.RootEnded(2.0)) == []
    assert machine.phase == Phase.TRAINING and machine.round == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=12))
def test_a_region_never_runs_a_round_its_root_did_not_ask_for(asked: list[int]) -> None:
    machine = region()
    machine.handle(ev.Started(0.0))
    now = 1.0
    opened: list[int] = []
    for rnd in asked:
        now += 1.0
        opened += [a.round for a in only(machine.handle(ev.RootTask(now, rnd, 1e9)), ev.Dispatch)]
        if machine.phase == Phase.TRAINING:
            opened += [a.round for a in only(finish_round(machine, now), ev.Dispatch)]
            while machine.phase == Phase.TRAINING:
                opened += [a.round for a in only(finish_round(machine, now), ev.Dispatch)]
    assert set(opened) <= set(asked)
    assert opened == sorted(set(opened))  # each once, in order


def test_a_region_outlives_its_own_num_rounds_until_the_root_ends() -> None:
    machine = region(num_rounds=1)
    machine.handle(ev.Started(1.0))
    machine.handle(ev.RootTask(2.0, 1, deadline=100.0))
    assert finish_round(machine, 3.0) == [ev.AwaitRoot(2)]  # not JobFinished: the answer may still be out
    assert only(machine.handle(ev.RootTask(4.0, 2, deadline=100.0)), ev.Dispatch)


def test_a_task_asked_too_late_fails_without_dispatching() -> None:
    machine = region()
    machine.handle(ev.Started(1.0))
    actions = machine.handle(ev.RootTask(10.0, 1, deadline=12.0))  # 12 - 5 is already past
    assert not only(actions, ev.Dispatch)
    assert only(actions, ev.RootRoundFailed)
    assert machine.phase == Phase.AWAITING_ROOT and machine.round == 2


def test_a_restart_grants_a_fresh_timeout_but_never_past_the_roots_deadline() -> None:
    machine = region()
    machine.handle(ev.Started(1.0))
    machine.handle(ev.RootTask(2.0, 1, deadline=100.0))
    assert machine.current is not None
    machine.handle(ev.Started(90.0, fresh_deadline=True))
    assert machine.current.deadline == 100.0 - MARGIN


def test_the_root_asking_again_caps_the_open_attempts_deadline() -> None:
    machine = RoundMachine(rules(paced_by_root=True, root_margin_seconds=MARGIN, round_timeout_seconds=600.0))
    seen_all(machine, 0.0)
    machine.handle(ev.Started(1.0))
    machine.handle(ev.RootTask(2.0, 1, deadline=None))  # an older root: no deadline
    assert machine.current is not None and machine.current.deadline == 602.0
    machine.handle(ev.RootTask(3.0, 1, deadline=50.0))
    assert machine.current.deadline == 50.0 - MARGIN
