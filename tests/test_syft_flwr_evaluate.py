"""Federated evaluation over real syft-flwr data owners: Flower ``evaluate`` messages.

With ``fraction_evaluate = 1.0`` every owner scores each new global model with its
ClientApp's ``@app.evaluate()`` function. The template reports the mean of the arrays it
received as ``eval_loss``, so the aggregate is known by hand: the mean of that round's
hand-computed model. Same cached environment as tests/test_syft_flwr.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from syftflwr.harness import (
    default_specs,
    env_or_skip,
    expected_models,
    initial_model,
    json_lines,
    make_federation,
)

pytestmark = [pytest.mark.slow]

NUM_ROUNDS = 2


def test_owners_score_each_new_model_with_their_evaluate_function(tmp_path: Path) -> None:
    environment = env_or_skip()
    federation = make_federation(environment, tmp_path / "federation", n_dos=3, log_dir=tmp_path / "logs")
    try:
        specs = default_specs(3, failing=None)
        federation.start_data_owners(specs)
        config = federation.write_daemon_job(
            tmp_path / "job",
            num_rounds=NUM_ROUNDS,
            job_name="evaljob",
            job={"fraction_evaluate": 1.0, "min_evaluate_nodes": 3},
        )
        run = federation.run_daemon(config, timeout_seconds=60)
        assert run.exit_code == 0, run.log_tail() + federation.log_tails()
        expected = expected_models(initial_model(), specs, NUM_ROUNDS)
        lines = list(json_lines(config.parent / "state" / "evaluations.jsonl"))
        assert [line["round"] for line in lines] == list(range(1, NUM_ROUNDS + 1)), lines
        for line in lines:
            assert sorted(line["succeeded"]) == sorted(s.email for s in specs), line
            assert line["num_examples"] == sum(s.num_examples for s in specs)
            model = expected[line["round"]]  # the aggregate of that round: what round + 1 trains
            want = float(np.mean(np.concatenate([a.astype(np.float64).ravel() for a in model.values()])))
            assert line["metrics"]["eval_loss"] == pytest.approx(want, rel=1e-6), line
        for spec in specs:
            calls = [t for t in federation.client_trace(spec.email) if t.get("kind") == "evaluate"]
            assert [c["metadata"]["message_type"] for c in calls] == ["evaluate"] * NUM_ROUNDS
        assert federation.wait_data_owners_exit(timeout_seconds=15) == {s.email: 0 for s in specs}
    finally:
        federation.close()
