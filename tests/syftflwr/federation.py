"""One federation's processes: the data owners, syft-flwr's own server, our daemon.

``make_federation`` lays out a federation (``layout.py``) in a throwaway folder.
``Federation.start_data_owner`` then runs the unmodified ``main.py`` as a data owner (DO);
``run_syft_flwr_server`` runs the same ``main.py`` with the aggregator's config, i.e.
syft-flwr's own server, and ``run_daemon`` runs ours (``write_daemon_job`` writes its job).

Every process starts in a session of its own and logs to a file; ``close`` stops each process
group (SIGTERM, then SIGKILL) and removes the shared root and the parties' folders unless
``$FL_SYFT_FLWR_KEEP`` is set. It is idempotent and also runs at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from support.jobs import AGGREGATOR, job_table, site_emails, write_job
from support.records import json_lines
from syftbox.harness import ManagedProcess, ProcessSet, wait_until
from syftflwr.environment import SyftFlwrEnv, SyftFlwrUnavailable
from syftflwr.fedavg import DataOwnerSpec, initial_model
from syftflwr.layout import FederationLayout, Party, bootstrap_app
from syftflwr.records import DaemonRun, ServerRun

KEEP_ENV = "FL_SYFT_FLWR_KEEP"


@dataclass
class Federation(FederationLayout):
    """An aggregator and N data owners over one shared SyftBox root, one bootstrapped app."""

    env: SyftFlwrEnv
    model: dict[str, np.ndarray]
    owns_workdir: bool = True
    processes: ProcessSet = field(init=False)
    _do_processes: dict[str, ManagedProcess] = field(default_factory=dict)
    _closed: bool = False

    def __post_init__(self) -> None:
        self.processes = ProcessSet(self.log_dir)
        atexit.register(self.close)

    def _start_main_py(self, party: Party, name: str, extra_env: Mapping[str, str]) -> ManagedProcess:
        """Run the party's bootstrapped ``main.py``: a DO, or syft-flwr's server for the aggregator."""
        env = self.env.process_env(party.home, {**party.main_py_env(), **extra_env})
        return self.processes.start(name, [str(self.env.python), "main.py"], env=env, cwd=party.project_dir)

    # ---- data owners

    def start_data_owner(
        self, spec: DataOwnerSpec, extra_env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        """Run the unmodified ``main.py`` as this DO (encrypted unless the federation is not)."""
        extra = {"FLT_TRACE": str(self.trace_path(spec.email)), **spec.env(), **(extra_env or {})}
        process = self._start_main_py(self.data_owners[spec.email], f"do-{spec.email}", extra)
        self._do_processes[spec.email] = process
        return process

    def start_data_owners(self, specs: Sequence[DataOwnerSpec], *, timeout_seconds: float = 60.0) -> float:
        """Start every DO and wait until each has published its RPC schema; return the seconds."""
        started = time.monotonic()
        for spec in specs:
            self.start_data_owner(spec)
        self.wait_published([s.email for s in specs], timeout_seconds=timeout_seconds)
        return time.monotonic() - started

    def data_owner(self, email: str) -> ManagedProcess:
        """The DO's process."""
        return self._do_processes[email]

    def wait_published(self, emails: Sequence[str], *, timeout_seconds: float = 60.0) -> float:
        """Wait until each DO's rpc.schema.json names /messages (it is then watching)."""

        def published() -> bool:
            for email in emails:
                try:
                    schema = json.loads((self.rpc_dir(email) / "rpc.schema.json").read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    return False
                if "/messages" not in schema:
                    return False
            return True

        return wait_until(
            published,
            timeout_seconds=timeout_seconds,
            what=f"data owners {list(emails)} to publish their RPC schema",
            check=lambda: self._check_alive(emails),
        )

    def _check_alive(self, emails: Sequence[str]) -> None:
        for email in emails:
            process = self._do_processes.get(email)
            if process is not None and not process.alive():
                raise SyftFlwrUnavailable(
                    f"data owner {email} exited with {process.popen.returncode}:\n{process.log_tail()}"
                )

    def wait_data_owners_exit(self, *, timeout_seconds: float) -> dict[str, int | None]:
        """Wait (up to the deadline) for every DO to exit by itself; return their exit codes."""
        with contextlib.suppress(TimeoutError):
            wait_until(
                lambda: not any(p.alive() for p in self._do_processes.values()),
                timeout_seconds=timeout_seconds,
                what="the data owners to exit",
                interval_seconds=0.05,
            )
        return {email: p.popen.poll() for email, p in self._do_processes.items()}

    # ---- the servers

    def write_daemon_job(
        self,
        folder: Path,
        *,
        num_rounds: int = 3,
        round_timeout_seconds: float = 20.0,
        job_name: str = "testjob",
        **sections: dict[str, Any],
    ) -> Path:
        """Our daemon's job for this federation: protocol syft-flwr, FedAvg over every DO.

        The state folder is ``folder/state``; the initial model is ``initial.npz`` (the one the
        ServerApp starts from). ``sections`` merge into the table (e.g. ``daemon={...}``).
        """
        merged: dict[str, dict[str, Any]] = {
            "job": {
                "name": job_name,
                "protocol": "syft-flwr",
                "num_rounds": num_rounds,
                "round_timeout_seconds": round_timeout_seconds,
                "available_timeout_seconds": 30.0,
                "min_train_nodes": 2,
                "min_available_nodes": len(self.emails),
            },
            "syftbox": {
                "root": str(self.root),
                "aggregator_email": self.aggregator.email,
                "datasites": self.emails,
            },
            # Encryption is on unless the job says otherwise: only "off" is written.
            "syft_flwr": {
                "app_name": self.app_name,
                **({} if self.aggregator.encryption else {"encryption": False}),
            },
            "state": {"state_dir": "state"},
        }
        for name, values in sections.items():
            merged[name] = {**merged.get(name, {}), **values}
        table = job_table(len(self.emails), **merged)
        table["model"] = {"source": "checkpoint", "checkpoint_path": str(self.initial_npz)}
        return write_job(folder, table)

    def run_syft_flwr_server(
        self,
        *,
        timeout_seconds: float,
        round_timeout_seconds: float = 20.0,
        poll_interval_seconds: float | None = None,
        extra_env: Mapping[str, str] | None = None,
        name: str = "server-syft-flwr",
    ) -> ServerRun:
        """Run syft-flwr's own server (main.py as the aggregator) to completion.

        The ServerApp is the template's: FedAvg over every DO, evaluation off, its per-round
        timeout ``round_timeout_seconds``; syft-flwr polls for responses every
        ``poll_interval_seconds`` (its default, 3 s, when None). It sends the stop message
        to every DO when it ends.
        """
        trace = self.trace_dir / f"{name}.jsonl"
        final = self.trace_dir / f"{name}-final.npz"
        trace.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        extra = {
            "FLT_INITIAL_NPZ": str(self.initial_npz),
            "FLT_ROUND_TIMEOUT": repr(float(round_timeout_seconds)),
            "FLT_MIN_NODES": str(len(self.data_owners)),
            "FLT_SERVER_TRACE": str(trace),
            "FLT_SERVER_FINAL": str(final),
            **(
                {"SYFT_FLWR_POLL_INTERVAL": repr(float(poll_interval_seconds))}
                if poll_interval_seconds
                else {}
            ),
            **(extra_env or {}),
        }
        started = time.monotonic()
        process = self._start_main_py(self.aggregator, name, extra)
        code = _wait_exit(process, timeout_seconds)
        seconds = time.monotonic() - started
        return ServerRun(code, seconds, list(json_lines(trace)), process.log_path, final)

    def run_daemon(
        self,
        config_path: Path,
        *,
        timeout_seconds: float,
        name: str = "daemon",
        extra_args: Sequence[str] = (),
    ) -> DaemonRun:
        """Run our daemon with this environment's Python (it has flwr), the repo on PYTHONPATH."""
        started = time.monotonic()
        process = self.start_daemon(config_path, name=name, extra_args=extra_args)
        code = _wait_exit(process, timeout_seconds)
        seconds = time.monotonic() - started
        return DaemonRun(code, seconds, list(json_lines(process.log_path)), process.log_path, config_path)

    def start_daemon(
        self, config_path: Path, *, name: str = "daemon", extra_args: Sequence[str] = ()
    ) -> ManagedProcess:
        """Start our daemon and return at once (run_daemon waits for it)."""
        command = [
            str(self.env.python),
            "-m",
            "fl_orchestrator.cli.daemon_main",
            "--config",
            str(config_path),
            "--log-format",
            "json",
            *extra_args,
        ]
        return self.processes.start(
            name, command, env=self.env.daemon_env(self._daemon_home()), cwd=config_path.parent
        )

    def run_server_app(
        self,
        project: Path,
        state_dir: Path,
        *,
        timeout_seconds: float,
        extra_env: Mapping[str, str] | None = None,
    ) -> DaemonRun:
        """``fl-orchestratord --server-app PROJECT`` (a custom-loop ServerApp) to its end."""
        command = self.server_app_command(project, state_dir)
        started = time.monotonic()
        env = self.env.daemon_env(self._daemon_home(), extra_env)
        process = self.processes.start("server-app", command, env=env, cwd=project)
        code = _wait_exit(process, timeout_seconds)
        seconds = time.monotonic() - started
        return DaemonRun(code, seconds, list(json_lines(process.log_path)), process.log_path, project)

    def server_app_command(self, project: Path, state_dir: Path) -> list[str]:
        """The command line of ``fl-orchestratord --server-app`` for this federation."""
        command = [
            str(self.env.python),
            "-m",
            "fl_orchestrator.cli.daemon_main",
            "--server-app",
            str(project),
            "--syftbox-root",
            str(self.root),
            "--state-dir",
            str(state_dir),
            "--log-format",
            "json",
        ]
        if not self.aggregator.encryption:
            command.append("--no-encryption")
        return command

    def run_tool(
        self, args: Sequence[str], *, timeout_seconds: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """``fl-orchestrator ARGS`` with this environment's Python (a syft-flwr job needs flwr to load)."""
        return self.env.run_python(
            ["-m", "fl_orchestrator.cli.tool_main", *args],
            cwd=self.workdir,
            home=self._daemon_home(),
            timeout_seconds=timeout_seconds,
        )

    def _daemon_home(self) -> Path:
        """HOME of the daemon and the tool: ``<work>/daemon-home``."""
        home = self.workdir / "daemon-home"
        home.mkdir(parents=True, exist_ok=True)
        return home

    # ---- teardown

    def close(self) -> None:
        """Stop every process (by process group) and remove the work folder. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.processes.close()
        finally:
            if self.owns_workdir and not os.environ.get(KEEP_ENV):
                shutil.rmtree(self.workdir / "root", ignore_errors=True)
                shutil.rmtree(self.workdir / "parties", ignore_errors=True)
            atexit.unregister(self.close)


def make_federation(
    env: SyftFlwrEnv,
    workdir: Path | None = None,
    *,
    n_dos: int = 3,
    aggregator: str = AGGREGATOR,
    emails: Sequence[str] | None = None,
    log_dir: Path | None = None,
    extra_params: int = 0,
    encryption: bool = True,
    components: tuple[str, str] | None = None,
) -> Federation:
    """Lay out one federation: shared root, configs, a bootstrapped project per party.

    The initial model is ``initial_model(extra_params)``, written to ``initial.npz``.

    Logs and traces stay in ``workdir`` (``log_dir`` may lie elsewhere); ``close`` removes the
    shared root and the parties' folders. ``app_name`` is the one bootstrap wrote. With
    ``encryption`` (syft-flwr's default) every party runs encrypted, the daemon's job too.
    """
    owns = workdir is None
    work = workdir or Path(tempfile.mkdtemp(prefix="fl-syft-flwr-"))
    work.mkdir(parents=True, exist_ok=True)
    dos = list(emails) if emails is not None else site_emails(n_dos)
    if len(set(dos)) != len(dos) or aggregator in dos:
        raise ValueError("emails must be unique and differ from the aggregator's")
    root = work / "root"
    (root / "datasites").mkdir(parents=True, exist_ok=True)
    (work / "traces").mkdir(parents=True, exist_ok=True)
    parties_dir = work / "parties"

    source, app_name = bootstrap_app(env, work, aggregator, dos, components)

    def party(email: str) -> Party:
        p = Party(email, parties_dir / email, root, encryption)
        p.write_config()
        shutil.copytree(source, p.project_dir, dirs_exist_ok=True)
        return p

    federation = Federation(
        env=env,
        workdir=work,
        app_name=app_name,
        aggregator=party(aggregator),
        data_owners={email: party(email) for email in dos},
        log_dir=log_dir or work / "logs",
        model=initial_model(extra_params),
        owns_workdir=owns,
    )
    np.savez(federation.initial_npz, **federation.model)  # type: ignore[arg-type]
    return federation


def _wait_exit(process: ManagedProcess, timeout_seconds: float) -> int | None:
    """Wait for a process to exit by itself; on overrun stop it and return None."""
    try:
        return process.popen.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        process.stop()
        return None
