"""An owner whose keys are published but who now runs with encryption off: said at once, with the fix.

The owners start encrypted (syft-flwr's default), publish their keys, then restart with
``SYFT_FLWR_ENCRYPTION_ENABLED=false``. Their keys are still in their datasites, so the
daemon encrypts for them; their handler cannot read the request and answers 200 with no
body. Every such answer is a counted failure whose message says what to change, and the
round fails at once instead of waiting for its timeout.
"""

from __future__ import annotations

import pytest

from syftflwr.harness import default_specs, env_or_skip, make_federation

pytestmark = [pytest.mark.slow]
ROUND_TIMEOUT_SECONDS = 60.0


def test_owners_that_turned_encryption_off_fail_the_round_at_once_with_the_fix(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = env_or_skip()
    federation = make_federation(env, tmp_path / "federation", n_dos=2, log_dir=tmp_path / "logs")
    try:
        specs = default_specs(2, failing=None)
        federation.start_data_owners(specs)  # encrypted: their keys are published now
        for spec in specs:
            federation.data_owner(spec.email).stop()
            federation.start_data_owner(spec, {"SYFT_FLWR_ENCRYPTION_ENABLED": "false"})
        job = federation.write_daemon_job(
            tmp_path / "job",
            num_rounds=1,
            round_timeout_seconds=ROUND_TIMEOUT_SECONDS,
            job={"max_round_retries": 0},
        )
        run = federation.run_daemon(job, timeout_seconds=90)
        assert run.exit_code == 1, run.log_tail()
        assert run.seconds < ROUND_TIMEOUT_SECONDS / 2, run.log_tail()  # not a timeout
        # The first empty answer already leaves too few owners: the round fails, the other is
        # abandoned; each empty answer is said with the fix.
        failed = run.named("result.failed")
        replies = run.named("syft_flwr.reply")
        assert failed and replies, run.log_tail()
        for event in [*failed, *replies]:
            text = str(event)
            assert "SYFT_FLWR_ENCRYPTION_ENABLED=false" in text and "encryption = false" in text, event
    finally:
        federation.close()
