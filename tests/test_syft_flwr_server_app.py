"""A custom-loop ServerApp, unchanged, on the daemon's transport: `fl-orchestratord --server-app`.

The project is the test app with its serverapp pointed at ``flt_app.analytics_app:app``, the
shape of syft-flwr's fed-analytics-diabetes: wait for the owners, send each a QUERY for a
histogram, sum the counts. Three real syft-flwr owners answer it at their default settings
(encryption on). The daemon runs the ServerApp's own main with its Grid over our transport.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from syftflwr.harness import default_specs, env_or_skip, make_federation

pytestmark = [pytest.mark.slow]


def test_an_unchanged_analytics_server_app_runs_on_the_daemons_transport(tmp_path: Path) -> None:
    env = env_or_skip()
    federation = make_federation(env, tmp_path / "federation", n_dos=3, log_dir=tmp_path / "logs")
    try:
        specs = default_specs(3, failing=None)  # deltas 0.25, -0.5, 1.0; 10, 20, 30 values each
        federation.start_data_owners(specs)
        project = federation.aggregator.project_dir
        pyproject = project / "pyproject.toml"
        pyproject.write_text(
            pyproject.read_text().replace("flt_app.server_app:app", "flt_app.analytics_app:app")
        )
        out = tmp_path / "histogram.json"
        run = federation.run_server_app(
            project,
            tmp_path / "state",
            timeout_seconds=60,
            extra_env={"FLT_ANALYTICS_OUT": str(out), "FLT_MIN_NODES": "3"},
        )
        assert run.exit_code == 0, run.log_tail() + federation.log_tails()
        result = json.loads(out.read_text())
        # Bins of [-2, -1, 0, 1, 2]: -0.5 x 20 in the second, 0.25 x 10 in the third, 1.0 x 30 in the last.
        assert result == {"nodes": 3, "answered": 3, "errors": [], "counts": [0, 20, 10, 30]}
        (finished,) = run.named("server_app.finished")
        assert finished["outcome"] == "done"
        assert {o: c["answered"] for o, c in finished["per_datasite"].items()} == {s.email: 1 for s in specs}
        (keys,) = run.named("syft_flwr.keys")
        assert keys["done"] == "created"  # encrypted, as the owners run
        # status.json counts what the loop sent and took per owner; `status --state-dir` reads it.
        shown = federation.run_tool(["status", "--state-dir", str(tmp_path / "state"), "--json"])
        assert shown.returncode == 0, shown.stderr
        status = json.loads(shown.stdout)
        assert (status["state"], status["phase"], status["round"]) == ("done", "done", None)
        for spec in specs:
            owner = status["datasites"][spec.email]
            assert (owner["selected"], owner["succeeded"], owner["failed"]) == (1, 1, 0), owner
            assert owner["last_seen"] is not None
        text = federation.run_tool(["status", "--state-dir", str(tmp_path / "state")])
        assert "a custom ServerApp loop" in text.stdout, text.stdout + text.stderr
        # The ServerApp ended, so the owners were sent the stop message and exited by themselves.
        exits = federation.wait_data_owners_exit(timeout_seconds=15)
        assert exits == {s.email: 0 for s in specs}, federation.log_tails()
    finally:
        federation.close()


def _use_analytics_app(project: Path) -> None:
    pyproject = project / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("flt_app.server_app:app", "flt_app.analytics_app:app"))


def test_sigterm_stops_a_waiting_server_app_within_the_shutdown_deadline(tmp_path: Path) -> None:
    env = env_or_skip()
    federation = make_federation(env, tmp_path / "federation", n_dos=3, log_dir=tmp_path / "logs")
    try:
        project = federation.aggregator.project_dir
        _use_analytics_app(project)
        # No owner runs: the ServerApp waits for nodes until the daemon is told to stop.
        command = federation.server_app_command(project, tmp_path / "state")
        env_vars = federation.env.daemon_env(tmp_path / "home", {"FLT_MIN_NODES": "3"})
        process = federation.processes.start("server-app", command, env=env_vars, cwd=project)
        wait_until_logged(process.log_path, "server_app.started")
        started = time.monotonic()
        process.popen.send_signal(signal.SIGTERM)
        assert process.popen.wait(timeout=15) == 1
        assert time.monotonic() - started < 8  # shutdown_timeout_seconds is 5
        events = [
            json.loads(line) for line in process.log_path.read_text().splitlines() if line.startswith("{")
        ]
        (finished,) = [e for e in events if e.get("event") == "server_app.finished"]
        assert finished["outcome"] == "stopped"
    finally:
        federation.close()


def wait_until_logged(path: Path, event: str, timeout_seconds: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if path.exists() and f'"event": "{event}"' in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{event} was not logged in {path}")
