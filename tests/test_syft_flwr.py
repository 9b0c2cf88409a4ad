"""The daemon with ``protocol = "syft-flwr"`` driving real, unmodified syft-flwr 0.5.3 data owners.

The harness (tests/syftflwr/) installs syft-flwr into a cached environment of its own and
runs everything that imports flwr with that environment's Python: the data owners (the
``main.py`` that ``syft_flwr.bootstrap`` writes), the daemon (with the repository on
PYTHONPATH: its syft-flwr codec imports flwr, which the project's venv does not hold) and the
tests in tests/syftflwr/ (codec, bridge, contract/). This module itself runs in the project's venv: it
never imports flwr, nor loads the job file (the loader refuses ``protocol = "syft-flwr"``
without flwr), so it reads the state folder directly. When the environment cannot be built
these tests skip and say why (``FL_SYFT_FLWR_REQUIRED=1`` makes that a failure).

The scenario runs once, in a module-scoped fixture: three DOs over one shared SyftBox root
(no sync), ds1 raising in round 2, three rounds of FedAvg; the tests then check one property
each. Run with ``-s`` for the round times.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_orchestrator.storage.models import ModelStore, load_weights_file

from syftflwr.harness import (
    SYFT_FLWR_VERSION,
    DaemonRun,
    DataOwnerSpec,
    Federation,
    SyftFlwrEnv,
    default_specs,
    env_or_skip,
    expected_models,
    initial_model,
    json_lines,
    make_federation,
    max_relative_error,
    quarantine_records,
    run_venv_tests,
)

pytestmark = [pytest.mark.slow]

JOB_NAME = "testjob"
NUM_ROUNDS = 3
ROUND_TIMEOUT_SECONDS = 20.0
FAILING = "ds1@example.org"
FAIL_ROUND = 2
# The daemon's own deadline in the test: far beyond a healthy run (a few seconds).
DAEMON_DEADLINE_SECONDS = 75.0
# How long the DOs get to exit after the daemon ends (they exit at the stop message).
DO_EXIT_SECONDS = 15.0

Event = dict[str, Any]


@dataclass
class Scenario:
    """Everything the run left, collected before the processes were stopped."""

    federation: Federation
    specs: list[DataOwnerSpec]
    run: DaemonRun
    state_dir: Path
    do_exit_codes: dict[str, int | None]
    traces: dict[str, list[Event]]
    lost_reply_lines: dict[str, list[str]]
    error_responses: dict[str, list[Event]]
    do_logs: dict[str, str]
    metrics: list[Event]
    status: dict[str, Any]
    quarantine: list[dict[str, Any]]

    def explain(self) -> str:
        """The daemon's log tail and the DOs' logs, for failure messages."""
        return self.run.log_tail() + "\n" + self.federation.log_tails()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def syft_flwr_env() -> SyftFlwrEnv:
    """The cached syft-flwr install; skip (or fail, if required) when it cannot be made."""
    return env_or_skip()


@pytest.fixture(scope="module")
def scenario(
    syft_flwr_env: SyftFlwrEnv, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Scenario:
    """Three DOs (ds1 raises in round 2), our daemon, three rounds of FedAvg."""
    folder = tmp_path_factory.mktemp("syft_flwr_daemon")
    federation = make_federation(syft_flwr_env, folder / "federation", n_dos=3, log_dir=folder / "logs")
    request.addfinalizer(federation.close)
    specs = default_specs(3, failing=1, fail_round=FAIL_ROUND)
    assert specs[1].email == FAILING
    try:
        federation.start_data_owners(specs)
        config_path = federation.write_daemon_job(
            folder / "job",
            num_rounds=NUM_ROUNDS,
            round_timeout_seconds=ROUND_TIMEOUT_SECONDS,
            job_name=JOB_NAME,
        )
        run = federation.run_daemon(config_path, timeout_seconds=DAEMON_DEADLINE_SECONDS)
        exits = federation.wait_data_owners_exit(timeout_seconds=DO_EXIT_SECONDS)
        state_dir = config_path.parent / "state"
        status_path = state_dir / "status.json"
        return Scenario(
            federation=federation,
            specs=specs,
            run=run,
            state_dir=state_dir,
            do_exit_codes=exits,
            traces={e: federation.client_trace(e) for e in federation.emails},
            lost_reply_lines=federation.lost_reply_lines(),
            error_responses={e: federation.error_responses(e) for e in federation.emails},
            do_logs={
                e: federation.do_log(e).read_text(encoding="utf-8", errors="replace")
                for e in federation.emails
            },
            metrics=list(json_lines(state_dir / "metrics.jsonl")),
            status=json.loads(status_path.read_text()) if status_path.exists() else {},
            quarantine=quarantine_records(state_dir),
        )
    except BaseException:
        print(federation.log_tails())
        raise
    finally:
        federation.close()


# --------------------------------------------------------------------------- in the venv


def test_the_tests_that_need_flwr_pass_inside_the_syft_flwr_environment(syft_flwr_env: SyftFlwrEnv) -> None:
    """tests/syftflwr/: the codec and bridge tests, and the contract tests (contract/)."""
    try:
        done = run_venv_tests(syft_flwr_env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the tests in the syft-flwr environment did not finish: {exc}")
    if done.returncode != 0:
        print(done.stdout)
    assert done.returncode == 0, done.stdout[-8000:]


# --------------------------------------------------------------------------- the daemon


def _train_calls(trace: Sequence[Event]) -> list[Event]:
    return [t for t in trace if t.get("kind") == "train"]


def test_the_daemon_runs_every_round_and_exits_0(scenario: Scenario) -> None:
    run = scenario.run
    assert run.exit_code == 0, scenario.explain()
    assert sorted(run.completed) == list(range(1, NUM_ROUNDS + 1)), scenario.explain()
    assert scenario.status.get("state") == "done", scenario.status


def test_the_final_model_is_the_hand_computed_weighted_fedavg(scenario: Scenario, tmp_path: Path) -> None:
    run = scenario.run
    assert run.exit_code == 0, scenario.explain()
    expected = expected_models(initial_model(), scenario.specs, NUM_ROUNDS)
    store = ModelStore(scenario.state_dir, JOB_NAME)
    assert store.rounds() == list(range(NUM_ROUNDS + 1))
    for rnd, want in enumerate(expected):
        got = store.load(rnd)
        assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}
        error = max_relative_error(got, want)
        assert error <= 1e-6, f"round {rnd}: off by {error}\n got {got}\nwant {want}"
    # And what `fl-orchestrator export` hands out (run where flwr is, as the daemon).
    out = tmp_path / "final.npz"
    done = scenario.federation.run_tool(["export", "--config", str(run.config_path), "--out", str(out)])
    assert done.returncode == 0, done.stdout
    assert max_relative_error(load_weights_file(out), expected[-1]) <= 1e-6


def test_each_data_owner_trained_once_per_round_on_that_rounds_global_model(scenario: Scenario) -> None:
    expected = expected_models(initial_model(), scenario.specs, NUM_ROUNDS)
    for email, trace in scenario.traces.items():
        calls = _train_calls(trace)
        assert [c["server_round"] for c in calls] == list(range(1, NUM_ROUNDS + 1)), (email, calls)
        for call in calls:
            rnd = int(call["server_round"])
            arrays = call["arrays"]
            assert arrays["dtypes"] == ["float32", "float32"]
            assert arrays["shapes"] == [[4, 3], [3]]
            want = expected[rnd - 1]
            got = {
                name: np.asarray(values).reshape(want[name].shape)
                for name, values in zip(want, arrays["values"], strict=True)
            }
            assert max_relative_error(got, want) <= 1e-6, (email, rnd, got)
            assert call["metadata"]["message_type"] == "train"


def test_no_reply_is_lost_every_request_gets_exactly_one_counted_response(scenario: Scenario) -> None:
    run = scenario.run
    assert run.exit_code == 0, scenario.explain()
    emails = scenario.federation.emails
    assert [m["round"] for m in scenario.metrics] == list(range(1, NUM_ROUNDS + 1))
    for line in scenario.metrics:
        assert line["timed_out"] == [], line
        counted = sorted([*line["succeeded"], *line["failed"]])
        assert counted == sorted(emails), line
        assert line["attempt"] == 1, line
    # One result event per (round, DO): accepted or failed, never both, never twice.
    seen: dict[tuple[int, str], int] = {}
    for event in [*run.named("result.accepted"), *run.named("result.failed")]:
        key = (int(event["round"]), str(event["datasite"]))
        seen[key] = seen.get(key, 0) + 1
    assert seen == {(r, e): 1 for r in range(1, NUM_ROUNDS + 1) for e in emails}, seen
    # The DOs' side: no 400/419 answers, none logged, no error response left behind.
    assert scenario.lost_reply_lines == {e: [] for e in emails}
    assert scenario.error_responses == {e: [] for e in emails}


def test_a_raising_data_owner_is_a_failure_and_the_round_does_not_wait_for_the_timeout(
    scenario: Scenario,
) -> None:
    run = scenario.run
    assert run.exit_code == 0, scenario.explain()
    by_round = {int(m["round"]): m for m in scenario.metrics}
    second = by_round[FAIL_ROUND]
    assert sorted(second["succeeded"]) == sorted(e for e in scenario.federation.emails if e != FAILING)
    assert list(second["failed"]) == [FAILING], second
    assert second["timed_out"] == []
    assert second["collect_seconds"] < ROUND_TIMEOUT_SECONDS / 2, second
    failed = [e for e in run.named("result.failed") if e.get("datasite") == FAILING]
    assert [int(e["round"]) for e in failed] == [FAIL_ROUND], failed
    assert "FLT_FAIL_ROUNDS" in json.dumps(failed), failed
    completed = run.completed[FAIL_ROUND]
    assert (completed["succeeded"], completed["failed"], completed["timed_out"]) == (2, 1, 0)
    for rnd in (1, 3):
        assert (run.completed[rnd]["succeeded"], run.completed[rnd]["timed_out"]) == (3, 0)
    raised = [c for c in _train_calls(scenario.traces[FAILING]) if c["raised"]]
    assert [c["server_round"] for c in raised] == [FAIL_ROUND]


def test_every_data_owner_exits_by_itself_after_the_stop_message(scenario: Scenario) -> None:
    assert scenario.run.exit_code == 0, scenario.explain()
    assert scenario.do_exit_codes == {e: 0 for e in scenario.federation.emails}, scenario.explain()
    for email, text in scenario.do_logs.items():
        assert "Received stop signal" in text, email
        assert "FL CLIENT completed!" in text, email


def test_every_message_travels_encrypted_with_the_owners_default_settings(scenario: Scenario) -> None:
    # The DOs run main.py with no SYFT_FLWR_ENCRYPTION_ENABLED (on, syft-flwr's default); the
    # daemon's job does not set [syft_flwr] encryption (on, ours).
    (keys,) = scenario.run.named("syft_flwr.keys")
    assert keys["done"] == "created"
    assert scenario.run.named("syft_flwr.plaintext_reply") == []
    assert scenario.run.named("syft_flwr.owner_without_keys") == []
    did = (
        scenario.federation.root / "datasites" / scenario.federation.aggregator.email / "public" / "did.json"
    )
    assert json.loads(did.read_text())["keyAgreement"]
    (key_file,) = (scenario.state_dir / "keys").rglob("pvt.jwks.json")
    assert key_file.stat().st_mode & 0o077 == 0
    for email, log in scenario.do_logs.items():
        # A DO in plaintext mode says PLAINTEXT; each encrypted reply is sealed by syft-rpc for us.
        assert "PLAINTEXT" not in log, email
        assert log.count("Preparing ENCRYPTED reply") == NUM_ROUNDS, email


def test_nothing_is_quarantined(scenario: Scenario) -> None:
    assert scenario.quarantine == [], scenario.quarantine
    assert scenario.run.named("file.rejected") == []


def test_round_times(scenario: Scenario, request: pytest.FixtureRequest) -> None:
    run = scenario.run
    assert run.exit_code == 0, scenario.explain()
    seconds = [float(m["collect_seconds"]) for m in scenario.metrics]
    assert len(seconds) == NUM_ROUNDS
    assert all(0 < s < ROUND_TIMEOUT_SECONDS / 2 for s in seconds), seconds
    print(
        f"\ndaemon over syft-flwr {SYFT_FLWR_VERSION} DOs, 3 DOs, FedAvg: collect_seconds "
        + "  ".join(f"{s:.3f}" for s in seconds)
        + f"; whole run {run.seconds:.1f} s"
    )
    request.node.user_properties.append(("collect_seconds_syft_flwr", seconds))
