"""kill -9 of the daemon mid-round over real syft-flwr data owners: it resumes, nothing is lost.

Round 2 is dispatched; ds2's ClientApp takes a while to answer it (FLT_SLOW_ROUNDS), and the
daemon is killed before it does. ds2 answers while no daemon runs. The restarted daemon
replays round 2 from its round log, finds the reply that arrived meanwhile, and finishes the
job with the same model as a run without the crash. Uses the same cached syft-flwr
environment as tests/test_syft_flwr.py, and skips (or fails) the same way.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from fl_orchestrator.storage.models import ModelStore

from syftbox.harness import wait_until
from syftflwr.harness import (
    SyftFlwrEnv,
    default_specs,
    env_or_skip,
    expected_models,
    initial_model,
    json_lines,
    make_federation,
    max_relative_error,
    quarantine_records,
)

pytestmark = [pytest.mark.slow]

JOB_NAME = "resumejob"
NUM_ROUNDS = 3
SLOW = "ds2@example.org"
SLOW_ROUND = 2
SLOW_SECONDS = 2.0


@pytest.fixture(scope="module")
def syft_flwr_env() -> SyftFlwrEnv:
    """The same cached syft-flwr install as tests/test_syft_flwr.py's, skipped or failed the same way."""
    return env_or_skip()


def test_a_daemon_killed_mid_round_resumes_and_loses_no_reply(
    syft_flwr_env: SyftFlwrEnv, tmp_path: Path
) -> None:
    federation = make_federation(syft_flwr_env, tmp_path / "federation", n_dos=3, log_dir=tmp_path / "logs")
    try:
        specs = default_specs(3, failing=None)
        assert specs[2].email == SLOW
        for spec in specs:
            extra = {"FLT_SLOW_ROUNDS": str(SLOW_ROUND), "FLT_SLOW_SECONDS": repr(SLOW_SECONDS)}
            federation.start_data_owner(spec, extra if spec.email == SLOW else None)
        federation.wait_published([s.email for s in specs])
        config = federation.write_daemon_job(
            tmp_path / "job", num_rounds=NUM_ROUNDS, round_timeout_seconds=30.0, job_name=JOB_NAME
        )
        first = federation.start_daemon(config, name="daemon-first")

        def round_two_dispatched() -> bool:
            return any(
                e.get("event") == "round.dispatched" and e.get("round") == SLOW_ROUND
                for e in json_lines(first.log_path)
            )

        wait_until(round_two_dispatched, timeout_seconds=60, what="round 2 dispatched", interval_seconds=0.02)
        os.killpg(first.pid, signal.SIGKILL)
        first.popen.wait(timeout=10)
        killed_log = list(json_lines(first.log_path))
        assert not any(
            e.get("event") == "round.completed" and e.get("round") == SLOW_ROUND for e in killed_log
        )

        def slow_reply_written() -> bool:
            # Nobody deletes it: the daemon that would have is dead.
            return _responses(federation.root, SLOW) > 0

        wait_until(slow_reply_written, timeout_seconds=30, what="ds2 answered while the daemon was down")
        second = federation.run_daemon(config, timeout_seconds=60, name="daemon-second")
        assert second.exit_code == 0, second.log_tail() + federation.log_tails()
        resumed = second.named("round.resumed")
        assert [int(e["round"]) for e in resumed] == [SLOW_ROUND], resumed

        state = config.parent / "state"
        metrics = list(json_lines(state / "metrics.jsonl"))
        assert [m["round"] for m in metrics] == list(range(1, NUM_ROUNDS + 1))
        for line in metrics:
            assert sorted(line["succeeded"]) == sorted(s.email for s in specs), line
            assert line["timed_out"] == [] and line["failed"] == {}, line
        expected = expected_models(initial_model(), specs, NUM_ROUNDS)
        store = ModelStore(state, JOB_NAME)
        assert max_relative_error(store.load(NUM_ROUNDS), expected[-1]) <= 1e-6
        # Each DO trained once per round: the crash re-sent nothing that had been answered.
        for spec in specs:
            rounds = [
                t["server_round"] for t in federation.client_trace(spec.email) if t.get("kind") == "train"
            ]
            assert rounds == list(range(1, NUM_ROUNDS + 1)), (spec.email, rounds)
        assert federation.lost_reply_lines() == {s.email: [] for s in specs}
        assert quarantine_records(state) == []
        exits = federation.wait_data_owners_exit(timeout_seconds=15)
        assert exits == {s.email: 0 for s in specs}
        print(json.dumps({"resumed_round": SLOW_ROUND, "second_run_seconds": round(second.seconds, 2)}))
    finally:
        federation.close()


def _responses(root: Path, owner: str) -> int:
    return len(list(root.glob(f"datasites/{owner}/app_data/flwr/*/rpc/messages/*/*.response")))
