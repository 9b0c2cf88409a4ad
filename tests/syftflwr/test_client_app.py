"""A Flower ClientApp trains under the native protocol (runs in the syft-flwr environment: flwr).

The real daemon and two `fl-orchestrator datasite --client-app` processes, each running
docs/examples/flower_client_app.py unchanged with its own ``partition-id`` in
``context.node_config``; the job's train_config reaches the handler as ``context.run_config``.
The final model is checked against the same steps computed by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from fl_orchestrator.config import load_config
from fl_orchestrator.storage.models import ModelStore, initial_model

from support.jobs import job_table, site_emails, write_job

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"


def _environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{EXAMPLES}", FL_ORCHESTRATOR_LOG_FORMAT="json")


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, env=_environment()
        )


def test_an_unchanged_flower_client_app_trains_under_the_native_protocol(tmp_path: Path) -> None:
    emails = site_emails(2)
    table = job_table(
        2,
        job={
            "num_rounds": 2,
            "min_train_nodes": 2,
            "train_config": {"lr": 0.5},
            "round_timeout_seconds": 30.0,
        },
    )
    job = write_job(tmp_path, table)
    config = load_config(job)
    sites = [
        _start(
            [
                "fl_orchestrator.cli.tool_main",
                "datasite",
                "--syftbox-root",
                str(config.syftbox.root),
                "--create",
                "--email",
                email,
                "--aggregator",
                config.syftbox.aggregator_email,
                "--job",
                config.job.name,
                "--client-app",
                "flower_client_app:app",
                "--node-config-value",
                f"partition-id={index}",
                "--heartbeat-interval-seconds",
                "0.2",
            ],
            tmp_path / f"site{index}.log",
        )
        for index, email in enumerate(emails)
    ]
    daemon = _start(["fl_orchestrator.cli.daemon_main", "--config", str(job)], tmp_path / "daemon.log")
    try:
        assert daemon.wait(timeout=90) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        for process in (daemon, *sites):
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
    # By hand: each round, datasite i steps every value halfway to i + 1, weighted 10 * (i + 1).
    model = {k: v.astype(np.float64) for k, v in initial_model(config.model).items()}
    for _ in range(2):
        steps = [{k: v + 0.5 * (i + 1.0 - v) for k, v in model.items()} for i in range(2)]
        model = {k: (10 * steps[0][k] + 20 * steps[1][k]) / 30 for k in model}
    final = ModelStore(config.state.state_dir, config.job.name).load(2)
    for name, expected in model.items():
        np.testing.assert_allclose(final[name], expected, rtol=1e-5)


def test_a_raising_handler_is_a_counted_failure_with_the_traceback_head(tmp_path: Path) -> None:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from fl_orchestrator.datasite.client_app import ClientAppError, ClientAppRunner

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        raise RuntimeError(f"no data at {context.node_config['data-path']}")

    runner = ClientAppRunner(app, email="a@x.org", node_config={"data-path": "/srv/data"})
    with pytest.raises(ClientAppError) as raised:
        runner.train({"w": np.zeros(3, np.float32)}, {"server-round": 1, "lr": 0.1})
    assert "no data at /srv/data" in str(raised.value)
    assert str(raised.value).startswith("RuntimeError: no data at /srv/data | ")
    assert "line" in str(raised.value)  # the head of the traceback: where it raised


def test_simulate_runs_the_client_app_in_process_and_the_model_is_the_hand_computed_one(
    tmp_path: Path,
) -> None:
    # The same ClientApp, 24 datasites hosted in one process (simulate/pool.py), each with its
    # partition-id from simulate; one --flaky datasite fails in round 2 through the ClientApp.
    count = 24
    job = write_job(
        tmp_path,
        job_table(count, job={"num_rounds": 2, "min_train_nodes": count - 1, "train_config": {"lr": 0.5}}),
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fl_orchestrator.cli.tool_main",
            "simulate",
            "--config",
            str(job),
            "--datasites",
            str(count),
            "--client-app",
            "flower_client_app:app",
            "--runners",
            "threads",
            "--flaky",
            "1",
            "--workdir",
            str(tmp_path / "sim"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_environment(),
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "in-process runners" in done.stdout and "(ClientAppError)" in done.stdout
    flaky = next(line for line in done.stdout.splitlines() if "flaky:" in line).split()[-1]
    config = load_config(tmp_path / "sim" / "job.toml")
    emails = list(config.syftbox.datasites)
    model = {k: v.astype(np.float64) for k, v in initial_model(config.model).items()}
    for rnd in (1, 2):
        taking_part = [i for i, e in enumerate(emails) if not (rnd == 2 and e == flaky)]
        weights = {i: 10 * (i + 1) for i in taking_part}
        total = sum(weights.values())
        model = {
            k: sum(w * (v + 0.5 * (i + 1.0 - v)) for i, w in weights.items()) / total
            for k, v in model.items()
        }
    final = ModelStore(config.state.state_dir, config.job.name).load(2)
    for name, expected in model.items():
        np.testing.assert_allclose(final[name], expected, rtol=1e-5)
