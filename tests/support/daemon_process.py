"""The installed `fl-orchestratord` as a separate process, and its JSON log as events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fl_orchestrator.config import JobConfig
from fl_orchestrator.storage.models import initial_model

from support import scripted

DAEMON = Path(sys.executable).with_name("fl-orchestratord")
TOOL = DAEMON.with_name("fl-orchestrator")
TESTS_DIR = Path(__file__).resolve().parent.parent
Event = dict[str, Any]


class DaemonProcess:
    """One run of the console script, its output in ``log_path``."""

    _count = 0

    def __init__(
        self,
        job: Path,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        user: int | None = None,
    ) -> None:
        DaemonProcess._count += 1
        self.log_path = job.parent / f"daemon-{DaemonProcess._count}.log"
        full_env = dict(os.environ, PYTHONPATH=str(TESTS_DIR), FL_ORCHESTRATOR_LOG_FORMAT="json")
        full_env.update(env or {})
        command = [str(DAEMON)]
        if user is not None:
            # Loaded as the caller, then run as `user` (support/run_as_user.py).
            command = [sys.executable, str(Path(__file__).with_name("run_as_user.py"))]
            full_env["RUN_AS_UID"] = str(user)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*command, "--config", str(job), "--log-format", "json", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
            )
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def wait(self, timeout: float = 60.0) -> int:
        """The exit code (negative: killed by that signal); kills the process on timeout."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"daemon still running after {timeout} s; see {self.log_path}") from None

    def kill(self) -> None:
        """Make sure the process is gone."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def output(self) -> str:
        """Everything it printed."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self, name: str | None = None) -> list[Event]:
        """Its JSON log events, optionally only those named ``name``."""
        found = []
        for line in self.output().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                found.append(event)
        return found

    def wait_for(
        self, name: str, where: Callable[[Event], bool] = lambda _: True, timeout: float = 30.0
    ) -> Event:
        """The first event named ``name`` that satisfies ``where``; polls the log every 20 ms."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events(name):
                if where(event):
                    return event
            if self.process.poll() is not None:
                raise AssertionError(
                    f"daemon exited {self.process.returncode} before {name}:\n{self.output()}"
                )
            time.sleep(0.02)
        raise AssertionError(f"no {name} within {timeout} s:\n{self.output()}")


def run_to_end(job: Path, expect: int = 0, timeout: float = 60.0, **options: Any) -> DaemonProcess:
    """Start the daemon and wait for it to exit with ``expect``; the process is gone afterwards."""
    daemon = DaemonProcess(job, **options)
    try:
        code = daemon.wait(timeout=timeout)
    finally:
        daemon.kill()
    assert code == expect, f"exit {code}, expected {expect}:\n{daemon.output()}"
    return daemon


def expected_model(config: JobConfig, rounds: int, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The model after ``rounds`` undisturbed FedAvg rounds of the scripted datasites."""
    model = initial_model(config.model)
    for _ in range(rounds):
        model = scripted.expected_fedavg(model, list(indices))
    return model


def assert_same_model(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    """Equal to 1e-6, relative to the values' scale."""
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        scale = max(1.0, float(np.max(np.abs(value))))
        assert float(np.max(np.abs(got[name] - value))) <= 1e-6 * scale, name
