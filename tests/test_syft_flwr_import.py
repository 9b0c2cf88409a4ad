"""Two commands: an unchanged syft-flwr project becomes a job, and real syft-flwr owners train through it.

The project is the test app (tests/syftflwr/app_template, a ``@app.main()`` ServerApp that
calls Flower's FedAvg ``strategy.start``), bootstrapped by ``syft_flwr.bootstrap``; the three
owners run its ``main.py`` with syft-flwr's default settings (encryption on). Then:

    fl-orchestrator init --from-syft-flwr <the aggregator's project> --syftbox-root <root>
    fl-orchestratord --config <the written job>

Both run with the syft-flwr environment's Python (the project's environment), as a data
scientist would run them with ``uv run``.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fl_orchestrator.storage.models import ModelStore

from syftflwr.harness import default_specs, env_or_skip, expected_models, make_federation
from syftflwr.layout import LEGACY_COMPONENTS

pytestmark = [pytest.mark.slow]


def test_an_unchanged_project_runs_under_the_daemon_with_two_commands(tmp_path: Path) -> None:
    env = env_or_skip()
    federation = make_federation(env, tmp_path / "federation", n_dos=3, log_dir=tmp_path / "logs")
    try:
        specs = default_specs(3, failing=None)
        federation.start_data_owners(specs)
        job = tmp_path / "job" / "fl-orchestrator.toml"
        job.parent.mkdir()
        done = federation.run_tool(
            [
                "init",
                "--from-syft-flwr",
                str(federation.aggregator.project_dir),
                "--syftbox-root",
                str(federation.root),
                "--out",
                str(job),
            ]
        )
        assert done.returncode == 0, done.stderr
        assert "translated:" in done.stdout and "FedAvg" in done.stdout
        table = tomllib.loads(job.read_text())
        assert table["syft_flwr"]["app_name"] == federation.app_name
        run = federation.run_daemon(job, timeout_seconds=75)
        assert run.exit_code == 0, run.log_tail() + federation.log_tails()
        store = ModelStore(job.parent / "state", table["job"]["name"])
        assert store.rounds()[-1] == 3
        # The project's FedAvg needs 2 owners present (min_available_nodes = 2), so a round may
        # start with 2 of the 3: the expected model follows who took part in each round.
        model = [np.asarray(a, np.float64) for a in federation.model.values()]
        by_email = {spec.email: spec for spec in specs}
        for line in (job.parent / "state" / "metrics.jsonl").read_text().splitlines():
            took_part = [by_email[email] for email in json.loads(line)["succeeded"]]
            total = sum(spec.num_examples for spec in took_part)
            step = sum(spec.delta * spec.num_examples for spec in took_part) / total
            model = [a + step for a in model]
        # The project names its arrays by position ("0", "1"), the harness by name: compare in order.
        for got, expected in zip(store.load(3).values(), model, strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-6)
        (keys,) = run.named("syft_flwr.keys")
        assert keys["done"] == "created"  # encrypted, as the owners run
    finally:
        federation.close()


def test_a_server_fn_project_whose_owners_run_a_numpy_client_trains_in_flowers_legacy_records(
    tmp_path: Path,
) -> None:
    # The shape of syft-flwr's fl-diabetes-prediction: server_fn with flwr.server.strategy.FedAvg,
    # owners with ClientApp(client_fn=...) and a NumPyClient, which read fitins.* / evaluateins.*.
    env = env_or_skip()
    federation = make_federation(
        env, tmp_path / "federation", n_dos=3, log_dir=tmp_path / "logs", components=LEGACY_COMPONENTS
    )
    try:
        specs = default_specs(3, failing=None)
        federation.start_data_owners(specs)
        job = tmp_path / "job" / "fl-orchestrator.toml"
        job.parent.mkdir()
        project = str(federation.aggregator.project_dir)
        done = federation.run_tool(
            [
                "init",
                "--from-syft-flwr",
                project,
                "--syftbox-root",
                str(federation.root),
                "--out",
                str(job),
                "--round-timeout-seconds",
                "30",
            ]
        )
        assert done.returncode == 0, done.stderr
        assert "content_format = 'legacy'" in done.stdout and "ClientApp(client_fn=...)" in done.stdout
        table = tomllib.loads(job.read_text())
        assert table["syft_flwr"]["content_format"] == "legacy"
        assert table["job"]["min_available_nodes"] == 3 and table["job"]["round_timeout_seconds"] == 30
        run = federation.run_daemon(job, timeout_seconds=90)
        assert run.exit_code == 0, run.log_tail() + federation.log_tails()
        expected = expected_models(federation.model, specs, 3)
        store = ModelStore(job.parent / "state", table["job"]["name"])
        for got, want in zip(store.load(3).values(), expected[3].values(), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6)
        rounds = [
            json.loads(line) for line in (job.parent / "state" / "metrics.jsonl").read_text().splitlines()
        ]
        assert [sorted(r["succeeded"]) for r in rounds] == [sorted(s.email for s in specs)] * 3
        # Every owner scored each new global model: loss = the mean of its values (evaluateres.loss).
        scored = run.named("evaluation.completed")
        assert [e["round"] for e in scored] == [1, 2, 3]
        for event, model in zip(scored, expected[1:], strict=True):
            mean = float(np.mean(np.concatenate([a.astype(np.float64).ravel() for a in model.values()])))
            assert event["metrics"]["loss"] == pytest.approx(mean, rel=1e-5)
            assert event["metrics"]["eval_mean"] == pytest.approx(mean, rel=1e-5)
    finally:
        federation.close()
