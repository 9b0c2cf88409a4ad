"""Real SyftBox sync on loopback: a throwaway install, one server, one client per party.

``ensure_syftbox_env`` installs PyPI's ``syftbox`` (pinned, with ``click<8.2``) into a
virtual environment of its own, cached under ``~/.cache/fl-orchestrator-tests/`` (or
``$FL_SYFTBOX_CACHE``) and keyed by version, never into the project's venv. It raises
``SyftBoxUnavailable`` with the reason when that fails, so the tests can skip saying why.

``SyftBoxNetwork`` starts ``uvicorn syftbox.server.server:app`` on 127.0.0.1 with auth
off, and one ``syftbox client`` per party, each with its own folder
``<workdir>/<email>/data`` (the SyftBox root that holds ``datasites/``), its own config
file and its own local port. ``start`` returns once every client has uploaded its
datasite and downloaded everybody else's ``public/`` folder, so sync works both ways.

Every process starts in a session of its own; ``close`` sends SIGTERM, then SIGKILL, to
each process group by PID and removes the work folder. It is idempotent and also runs at
interpreter exit, so a failing test or an interrupted run leaves nothing behind.

Facts about syftbox 0.4.0 that the tests rely on (read from its source):

- permissions come from ``syftperm.yaml`` (a list of {path, user, permissions}); a
  ``syft.pub.yaml`` is synced as an ordinary file and means nothing to it;
- a write the server refuses leaves the local file renamed ``<stem>.syftrejected<suffix>``;
  a deletion it refuses is undone by downloading the file again;
- files over 10 MB are refused on both sides (a validation error, retried every cycle);
- downloads are written in place (``Path.write_bytes``), not by temp name and rename;
- names with any part starting with '.', and ``*.tmp``, are never synced.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SYFTBOX_VERSION = "0.4.0"
# syftbox 0.4.0's typer-based CLI is used with click < 8.2.
REQUIREMENTS = (f"syftbox=={SYFTBOX_VERSION}", "click<8.2")
CACHE_ENV = "FL_SYFTBOX_CACHE"
KEEP_ENV = "FL_SYFTBOX_KEEP"
REJECTED_MARKERS = (".syftrejected", ".rejected.")
HOST = "127.0.0.1"


class SyftBoxUnavailable(RuntimeError):
    """syftbox could not be installed or started here; the message says why."""


# --------------------------------------------------------------------------- install


@dataclass(frozen=True)
class SyftBoxEnv:
    """A virtual environment that holds syftbox and nothing of the project."""

    venv: Path

    @property
    def python(self) -> Path:
        """The environment's interpreter."""
        return self.venv / "bin" / "python"

    def process_env(self, home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a syftbox process: none of the project's Python settings, HOME of its own."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("SYFTBOX_")
        }
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), env.get("PATH", "")])
        env["HOME"] = str(home)
        env["PYTHONUNBUFFERED"] = "1"
        env["NO_COLOR"] = "1"
        env.update(extra or {})
        return env


def default_cache_dir() -> Path:
    """Where installed environments are kept between runs."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fl-orchestrator-tests"


def _env_key() -> str:
    return f"syftbox-{SYFTBOX_VERSION}-click-lt-8.2-py{sys.version_info.major}.{sys.version_info.minor}"


def run_checked(
    command: Sequence[str],
    *,
    timeout: float,
    what: str,
    env: Mapping[str, str] | None = None,
    unavailable: type[Exception] = SyftBoxUnavailable,
) -> str:
    """Run a command to completion and return its output; ``unavailable`` (with its tail) if it fails."""
    try:
        done = subprocess.run(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            env=dict(env) if env is not None else None,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise unavailable(f"{what} failed: {exc}") from None
    output = done.stdout.decode("utf-8", "replace")
    if done.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise unavailable(f"{what} failed (exit {done.returncode}):\n{tail}")
    return output


def ensure_syftbox_env(cache_dir: Path | None = None, *, pip_timeout_seconds: float = 900.0) -> SyftBoxEnv:
    """Create (once) and return the cached environment with syftbox installed.

    The venv is created in place and marked complete only after the import check passes;
    a half-built one (interrupted run) is removed and built again. A file lock keeps
    concurrent test runs from building the same one twice.
    """
    cache = cache_dir or default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SyftBoxUnavailable(f"cannot create the cache folder {cache}: {exc}") from None
    venv = cache / _env_key()
    marker = venv / ".fl-orchestrator-ready"
    wanted = "\n".join(REQUIREMENTS)
    with open(cache / f"{_env_key()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == wanted and (venv / "bin" / "python").exists():
            return SyftBoxEnv(venv)
        shutil.rmtree(venv, ignore_errors=True)
        try:
            env = _build(venv, pip_timeout_seconds)
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)
            raise
        marker.write_text(wanted)
        return env


def _build(venv: Path, pip_timeout_seconds: float) -> SyftBoxEnv:
    run_checked([sys.executable, "-m", "venv", str(venv)], timeout=120, what="python -m venv")
    env = SyftBoxEnv(venv)
    # -I: neither the current folder (tests/ holds a package named syftbox) nor PYTHON* variables.
    pip = [str(env.python), "-I", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run_checked(
        [*pip, *REQUIREMENTS], timeout=pip_timeout_seconds, what=f"pip install {' '.join(REQUIREMENTS)}"
    )
    check = "import importlib.metadata as m, syftbox.server.server, uvicorn; print(m.version('syftbox'))"
    version = run_checked([str(env.python), "-I", "-c", check], timeout=120, what="importing syftbox").strip()
    if version.splitlines()[-1:] != [SYFTBOX_VERSION]:
        raise SyftBoxUnavailable(f"expected syftbox {SYFTBOX_VERSION}, the environment has {version!r}")
    return env


# --------------------------------------------------------------------------- processes


@dataclass
class ManagedProcess:
    """One child process in a session (process group) of its own, logging to a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """Also the process group id."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def stop(self, grace_seconds: float = 5.0) -> int | None:
        """SIGTERM the group, SIGKILL it after the grace period; return the exit code."""
        if self.alive():
            _signal_group(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace_seconds)
        # Children that outlived the leader (uvicorn workers, ...) go too.
        _signal_group(self.pid, signal.SIGKILL)
        if self.alive():
            self.popen.kill()
        code = self.popen.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def log_tail(self, lines: int = 40) -> str:
        """The end of the process's log, for failure messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        return "\n".join(text.splitlines()[-lines:])


def _grep(path: Path, needles: Sequence[str]) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if any(n in line for n in needles)]


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class ProcessSet:
    """Processes started for one test, all stopped by ``close`` (in reverse start order)."""

    log_dir: Path
    processes: list[ManagedProcess] = field(default_factory=list)

    def start(
        self,
        name: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start a process in its own session, stdout and stderr to ``<log_dir>/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - closed by ManagedProcess.stop
        try:
            popen = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        process = ManagedProcess(name, popen, log_path, log)
        self.processes.append(process)
        return process

    def close(self) -> None:
        """Stop every process, newest first."""
        while self.processes:
            self.processes.pop().stop()


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout_seconds: float,
    what: str,
    interval_seconds: float = 0.1,
    check: Callable[[], None] | None = None,
) -> float:
    """Poll until condition() holds; return the seconds it took. ``check`` may raise to stop early."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if check is not None:
            check()
        if time.monotonic() - started > timeout_seconds:
            raise TimeoutError(f"timed out after {timeout_seconds:.0f} s waiting for {what}")
        time.sleep(interval_seconds)


# --------------------------------------------------------------------------- network


@dataclass
class Party:
    """One SyftBox client: an email, its own folder, config file and local port."""

    email: str
    folder: Path
    port: int
    client: ManagedProcess | None = None

    @property
    def data_dir(self) -> Path:
        """The SyftBox root of this party: the folder that holds ``datasites/``."""
        return self.folder / "data"

    @property
    def datasites(self) -> Path:
        """This party's copy of every datasite it may read."""
        return self.data_dir / "datasites"

    @property
    def config_path(self) -> Path:
        """The client's config file."""
        return self.folder / "config.json"

    def sync_state(self) -> dict[str, Any]:
        """The client's record of the last sync action per path (plugins/local_syncstate.json)."""
        path = self.data_dir / "plugins" / "local_syncstate.json"
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}


@dataclass(frozen=True)
class SyncProblem:
    """A path whose last sync action the client recorded as rejected or failed."""

    party: str
    path: str
    status: str
    action: str | None
    message: str | None


class SyftBoxNetwork:
    """A SyftBox server and one client per email, on loopback, in a throwaway folder."""

    def __init__(
        self,
        env: SyftBoxEnv,
        emails: Sequence[str],
        *,
        workdir: Path | None = None,
        log_dir: Path | None = None,
    ) -> None:
        """``log_dir`` (default: inside the work folder) may lie outside it so logs outlive ``close``."""
        if len(set(emails)) != len(emails):
            raise ValueError("emails must be unique")
        self.env = env
        self._owns_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="fl-syftbox-"))
        self.processes = ProcessSet(log_dir or self.workdir / "logs")
        ports: set[int] = set()
        while len(ports) < len(emails) + 1:
            ports.add(free_port())
        self.server_port, *client_ports = sorted(ports)
        self.server_dir = self.workdir / "server"
        self.server: ManagedProcess | None = None
        pairs = zip(emails, client_ports, strict=True)
        self.parties = {email: Party(email, self.workdir / email, port) for email, port in pairs}
        self._closed = False
        atexit.register(self.close)

    @property
    def server_url(self) -> str:
        """Where the clients reach the server."""
        return f"http://{HOST}:{self.server_port}"

    def party(self, email: str) -> Party:
        """The party with that email."""
        return self.parties[email]

    # ---- start and stop

    def start(self, timeout_seconds: float = 90.0) -> float:
        """Start the server and every client; return the seconds until all of them sync."""
        started = time.monotonic()
        self.start_server(timeout_seconds)
        for email in self.parties:
            self.start_client(email)
        self.wait_synced(self.parties, timeout_seconds=timeout_seconds)
        return time.monotonic() - started

    def start_server(self, timeout_seconds: float = 60.0) -> None:
        """Start the server and wait until it answers on /info."""
        self.server_dir.mkdir(parents=True, exist_ok=True)
        env = self.env.process_env(
            self.server_dir,
            {"SYFTBOX_DATA_FOLDER": str(self.server_dir), "SYFTBOX_AUTH_ENABLED": "false"},
        )
        command = [
            str(self.env.python),
            "-I",
            "-m",
            "uvicorn",
            "syftbox.server.server:app",
            "--host",
            HOST,
            "--port",
            str(self.server_port),
        ]
        self.server = self.processes.start("server", command, env=env, cwd=self.server_dir)
        server = self.server

        def dead() -> None:
            if not server.alive():
                raise SyftBoxUnavailable(f"the SyftBox server exited:\n{server.log_tail()}")

        wait_until(
            self._server_answers, timeout_seconds=timeout_seconds, what="the SyftBox server", check=dead
        )

    def _server_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.server_url}/info", timeout=2) as response:
                return bool(json.loads(response.read()).get("version"))
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def start_client(self, email: str) -> ManagedProcess:
        """Start (or restart) one party's client; it keeps its folder, config and sync state."""
        party = self.parties[email]
        if party.client is not None and party.client.alive():
            raise RuntimeError(f"the client of {email} is already running")
        party.folder.mkdir(parents=True, exist_ok=True)
        command = [
            str(self.env.python),
            "-I",
            "-m",
            "syftbox.main",
            "client",
            "-d",
            str(party.data_dir),
            "-e",
            email,
            "-s",
            self.server_url,
            "-c",
            str(party.config_path),
            "-p",
            str(party.port),
            "--no-open-dir",
        ]
        party.client = self.processes.start(
            f"client-{email}", command, env=self.env.process_env(party.folder), cwd=party.folder
        )
        return party.client

    def stop_client(self, email: str) -> int | None:
        """Take one party offline: stop its client process (its folder stays as it is)."""
        party = self.parties[email]
        if party.client is None:
            return None
        client, party.client = party.client, None
        self.processes.processes.remove(client)
        return client.stop()

    def wait_synced(self, emails: Iterable[str], *, timeout_seconds: float = 60.0) -> float:
        """Wait until each of these clients has every party's ``public/syftperm.yaml`` and vice versa."""
        chosen = [self.parties[e] for e in emails]

        def synced() -> bool:
            for party in chosen:
                for other in self.parties.values():
                    if not (party.datasites / other.email / "public" / "syftperm.yaml").is_file():
                        return False
                    if not (other.datasites / party.email / "public" / "syftperm.yaml").is_file():
                        return False
            return True

        def dead() -> None:
            for party in self.parties.values():
                if party.client is not None and not party.client.alive():
                    raise SyftBoxUnavailable(
                        f"the SyftBox client of {party.email} exited:\n{party.client.log_tail()}"
                    )

        return wait_until(synced, timeout_seconds=timeout_seconds, what="the SyftBox clients", check=dead)

    def close(self) -> None:
        """Stop every process (by PID and process group) and remove the work folder. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.processes.close()
        finally:
            for party in self.parties.values():
                party.client = None
            self.server = None
            if self._owns_workdir and not os.environ.get(KEEP_ENV):
                shutil.rmtree(self.workdir, ignore_errors=True)
            atexit.unregister(self.close)

    # ---- what the sync did

    def rejected_files(self) -> list[Path]:
        """Every file in any party's folder that the sync renamed as rejected."""
        found: list[Path] = []
        for party in self.parties.values():
            for dirpath, _dirs, files in os.walk(party.datasites):
                found.extend(Path(dirpath) / n for n in files if any(m in n for m in REJECTED_MARKERS))
        return sorted(found)

    def files(self, email: str) -> list[str]:
        """Every file in one party's copy of the datasites, relative to its ``datasites/``."""
        root = self.parties[email].datasites
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def sync_problems(self) -> list[SyncProblem]:
        """Paths whose last sync action a client recorded as rejected or as an error."""
        problems: list[SyncProblem] = []
        for party in self.parties.values():
            info = party.sync_state().get("status_info", {})
            if not isinstance(info, dict):
                continue
            for path, entry in sorted(info.items()):
                if isinstance(entry, dict) and entry.get("status") in ("rejected", "error"):
                    problems.append(
                        SyncProblem(
                            party.email,
                            str(path),
                            str(entry.get("status")),
                            entry.get("action"),
                            entry.get("message"),
                        )
                    )
        return problems

    def client_log_lines(self, *needles: str) -> list[str]:
        """Lines of the clients' logs that contain any of the needles, each prefixed with its email."""
        lines: list[str] = []
        for party in self.parties.values():
            lines.extend(
                f"{party.email}: {line}"
                for line in _grep(self.processes.log_dir / f"client-{party.email}.log", needles)
            )
        return lines

    def server_log_lines(self, *needles: str) -> list[str]:
        """Lines of the server's log (one per request) that contain any of the needles."""
        return _grep(self.processes.log_dir / "server.log", needles)

    def log_tails(self, lines: int = 25) -> str:
        """The end of every log, for failure messages."""
        parts = []
        for log in sorted(self.processes.log_dir.glob("*.log")):
            text = log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)
