"""A whole federation on one machine: the daemon and datasite processes over one folder.

Used by the demo and by the end-to-end tests. Every process is a real
subprocess talking only through files; teardown kills by PID, even on error.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fl_orchestrator.config import JobConfig, load_config
from fl_orchestrator.simulate.pool import PoolSpec


@dataclass(frozen=True)
class DatasiteSpec:
    """One datasite process: its email, train function (or other code flags) and environment."""

    email: str
    train: str
    env: Mapping[str, str] = field(default_factory=dict)
    # Instead of ["--train", train] when set: e.g. ["--client-app", "m:app", "--node-config-value", "k=v"].
    code_args: Sequence[str] = ()


@dataclass
class LocalFederation:
    """Runs a job's datasites as processes; the daemon runs via ``run_daemon``."""

    config_path: Path
    log_dir: Path
    extra_pythonpath: Sequence[Path] = ()
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)
    _daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def config(self) -> JobConfig:
        """The job's config, as the daemon will see it."""
        return load_config(self.config_path)

    def _env(self, extra: Mapping[str, str]) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(p) for p in self.extra_pythonpath]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        env["FL_ORCHESTRATOR_LOG_FORMAT"] = "json"
        env.update(extra)
        return env

    def start_datasites(
        self,
        specs: Sequence[DatasiteSpec],
        *,
        heartbeat_interval_seconds: float = 0.5,
        rescan_interval_seconds: float = 2.0,
    ) -> None:
        """Start one runner process per datasite."""
        config = self.config
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            log = open(self.log_dir / f"{spec.email}.log", "wb")  # noqa: SIM115 - closed in stop()
            self._logs.append(log)
            command = [
                sys.executable,
                "-m",
                "fl_orchestrator.cli.tool_main",
                "datasite",
                "--syftbox-root",
                str(config.syftbox.root),
                "--create",  # the daemon may not have made the shared folder yet
                "--email",
                spec.email,
                "--aggregator",
                config.syftbox.aggregator_email,
                "--job",
                config.job.name,
                *(spec.code_args or ("--train", spec.train)),
                "--heartbeat-interval-seconds",
                str(heartbeat_interval_seconds),
                "--rescan-interval-seconds",
                str(rescan_interval_seconds),
            ]
            self.processes.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self._env(spec.env))
            )

    def start_daemon(self, config_path: Path, name: str) -> subprocess.Popen[bytes]:
        """Start another daemon in the background (a region of a tiered job), logging to ``name``.log."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        command = [sys.executable, "-m", "fl_orchestrator.cli.daemon_main", "--config", str(config_path)]
        command += ["--log-format", "json"]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self._env({}))
        self.processes.append(process)
        self._daemons.append(process)
        return process

    def start_pools(self, specs: Sequence[PoolSpec], *, name: str = "pool") -> None:
        """Start one process per pool of in-process datasite runners (simulate/pool.py)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for index, spec in enumerate(specs):
            spec_path = self.log_dir / f"{name}-{index}.json"
            spec.write(spec_path)
            log = open(self.log_dir / f"{name}-{index}.log", "wb")  # noqa: SIM115 - closed in stop()
            self._logs.append(log)
            # By module name: cli sits above simulate, so this layer starts it without importing it.
            command = [sys.executable, "-m", "fl_orchestrator.cli.datasite_cmd", "--spec", str(spec_path)]
            self.processes.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self._env({}))
            )

    def run_daemon(
        self, *, timeout_seconds: float, extra_args: Sequence[str] = ()
    ) -> Iterator[dict[str, Any]]:
        """Run the daemon to completion, yielding its JSON log events as they come.

        Non-JSON lines are yielded as {"event": "raw", "line": ...}. The last item
        is {"event": "daemon.exit", "code": N}.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "fl_orchestrator.cli.daemon_main",
            "--config",
            str(self.config_path),
            "--log-format",
            "json",
            *extra_args,
        ]
        daemon = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self._env({})
        )
        self.processes.append(daemon)
        assert daemon.stdout is not None
        timer = _Watchdog(daemon, timeout_seconds)
        with open(self.log_dir / "daemon.log", "wb") as raw_log:
            for raw in daemon.stdout:
                raw_log.write(raw)
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"event": "raw", "line": line}
                if not isinstance(event, dict):
                    event = {"event": "raw", "line": line}
                yield event
        code = daemon.wait()
        timer.cancel()
        yield {"event": "daemon.exit", "code": code, "timed_out": timer.fired}

    def stop(self) -> None:
        """Stop every process: SIGTERM, then SIGKILL after a short grace."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self._logs:
            log.close()
        self.processes.clear()
        self._logs.clear()


def wait_all(federations: Sequence[LocalFederation], *, timeout_seconds: float) -> int:
    """Wait, within one deadline, for every daemon started with ``start_daemon``; first non-zero code."""
    import time

    deadline = time.monotonic() + timeout_seconds
    codes = []
    for federation in federations:
        for process in federation._daemons:
            try:
                codes.append(process.wait(timeout=max(0.01, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(1)
    return next((code for code in codes if code), 0)


class _Watchdog:
    """Kills the daemon if it overruns its deadline, so a stuck run never hangs the caller."""

    def __init__(self, process: subprocess.Popen[bytes], seconds: float) -> None:
        import threading

        self.fired = False
        self._process = process
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        if self._process.poll() is None:
            self._process.kill()

    def cancel(self) -> None:
        self._timer.cancel()


def prepare_workdir(template: Path, workdir: Path) -> Path:
    """Copy a job file into workdir so its relative paths land there; return the copy."""
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / "job.toml"
    shutil.copyfile(template, target)
    return target
