"""Real syft-flwr 0.5.3 data owners on one machine, for the daemon's ``protocol = "syft-flwr"``.

``ensure_env`` installs PyPI's ``syft-flwr`` (pinned; it pulls flwr 1.25.0, syft-rpc,
syft-event and syft-core) into a virtual environment of its own, together with the daemon's
own dependencies and pytest. It is cached under ``~/.cache/fl-orchestrator-tests/`` (or
``$FL_SYFT_FLWR_CACHE``), keyed by the requirement list, never in the project's ``.venv``
(flwr pins ``pathspec<0.13``, which breaks the project's mypy) and never with the repository's
path inside it. It raises ``SyftFlwrUnavailable`` with the reason when that fails, so the
tests can skip saying why.

``make_federation`` lays out one federation in a throwaway folder: ONE shared SyftBox root
(``<work>/root``, holding ``datasites/<email>/``) instead of a sync, a syft_core config per
party, and per party a copy of ``app_template/`` bootstrapped with
``syft_flwr.bootstrap(..., transport="syftbox")`` (which writes ``[tool.syft_flwr]`` with a
fresh ``app_name`` and ``main.py``). ``Federation.start_data_owner`` then runs the unmodified
``main.py`` as a data owner (DO); ``run_syft_flwr_server`` runs the same ``main.py`` with the
aggregator's config, i.e. syft-flwr's own server, and ``run_daemon`` runs ours.

Every process starts in a session of its own and logs to a file; ``close`` stops each process
group (SIGTERM, then SIGKILL) and removes the work folder unless ``$FL_SYFT_FLWR_KEEP`` is set.
It is idempotent and also runs at interpreter exit.

Facts about syft-flwr 0.5.3's data-owner side that the tests rely on (read from its source):

- a DO publishes ``<root>/datasites/<DO>/app_data/flwr/<app_name>/rpc/{rpc.schema.json,syft.pub.yaml}``
  and watches ``rpc/messages/**/*.request`` for watchdog *created* and *moved* events only
  (not *modified*); requests already there at start are processed once;
- a request is a syft_rpc ``SyftRequest`` JSON file; the DO reads it once, at the event, and
  if it cannot be parsed (e.g. read while still being written) it answers
  ``400 "Error loading request: ..."`` and never looks at it again: a lost reply;
- the DO writes ``<id>.response`` with ``Path.write_text`` (no temp name, no rename) into
  ``<url's folder>/<request.sender>/``, named by the request's JSON ``id``, not its file name;
- a request whose ``expires`` has passed is answered ``419 "Request expired"``;
- if the ClientApp raises, the reply is a Flower ``Message`` carrying an ``Error`` with code
  ``CLIENT_APP_RAISED_EXCEPTION`` (status 200 at the RPC level);
- a SYSTEM message whose config has ``action = "stop"`` (or whose group_id is ``"final"``)
  makes the DO exit with status 0 after writing an empty 200 response to it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from support.jobs import AGGREGATOR, job_table, site_emails, write_job
from syftbox.harness import ManagedProcess, ProcessSet, default_cache_dir, wait_until

SYFT_FLWR_VERSION = "0.5.3"
FLWR_VERSION = "1.25.0"
CACHE_ENV = "FL_SYFT_FLWR_CACHE"
KEEP_ENV = "FL_SYFT_FLWR_KEEP"
REQUIRED_ENV = "FL_SYFT_FLWR_REQUIRED"
# syft-flwr 0.5.3 declares Requires-Python >= 3.12 but runs on 3.11; without --only-binary
# pip tries to build numpy from source for 3.11 and fails.
PIP_FLAGS = ("--only-binary", ":all:", "--ignore-requires-python")
TEST_REQUIREMENTS = ("pytest>=8", "hypothesis>=6.100")

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
TEMPLATE_DIR = HERE / "app_template"
ARRAY_NAMES = ("w0", "w1")

# What a DO logs (loguru) when a request gets no usable reply, and what syft-flwr's own
# server logs when a reply is missing or unusable.
DO_LOST_REPLY_MARKERS = (
    "Error loading request",
    "Request expired",
    "Invalid request schema",
    "Failed to deserialize message",
    "Error calling function",
)
SERVER_LOST_REPLY_MARKERS = (
    "Timeout reached",
    "Unexpected error pulling message",
    "Failed to deserialize message",
    "Error loading response",
)


class SyftFlwrUnavailable(RuntimeError):
    """syft-flwr could not be installed or run here; the message says why."""


# --------------------------------------------------------------------------- install


def requirements() -> tuple[str, ...]:
    """What the environment holds: syft-flwr (and its flwr), the daemon's dependencies, pytest.

    The daemon's dependencies are read from the project's pyproject.toml, so the environment
    follows them (a change there builds a new one, under a new key).
    """
    try:
        project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
        daemon = tuple(str(d) for d in project["project"]["dependencies"])
    except (OSError, KeyError, ValueError) as exc:
        raise SyftFlwrUnavailable(
            f"cannot read the daemon's dependencies from pyproject.toml: {exc}"
        ) from None
    return (f"syft-flwr=={SYFT_FLWR_VERSION}", f"flwr=={FLWR_VERSION}", *daemon, *TEST_REQUIREMENTS)


def env_key(reqs: Sequence[str]) -> str:
    """The cache folder's name: version, Python, and a hash of the requirement list."""
    digest = hashlib.sha256("\n".join([*reqs, *PIP_FLAGS]).encode()).hexdigest()[:12]
    return f"syft-flwr-{SYFT_FLWR_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}-{digest}"


@dataclass(frozen=True)
class SyftFlwrEnv:
    """A virtual environment with syft-flwr, flwr and the daemon's dependencies (not the daemon)."""

    venv: Path

    @property
    def python(self) -> Path:
        """The environment's interpreter."""
        return self.venv / "bin" / "python"

    def process_env(self, home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a syft-flwr process: none of the caller's Python or SyftBox settings."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
            and not k.startswith(("SYFTBOX_", "SYFT_FLWR_", "FLT_", "FL_ORCHESTRATOR_"))
        }
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), env.get("PATH", "")])
        env["HOME"] = str(home)
        env["PYTHONUNBUFFERED"] = "1"
        env["NO_COLOR"] = "1"
        env["LOGURU_COLORIZE"] = "false"
        env.update(extra or {})
        return env

    def daemon_env(self, home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for the daemon run by this interpreter: the repository on PYTHONPATH."""
        env = self.process_env(home, extra)
        env["PYTHONPATH"] = str(REPO_ROOT)
        return env


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return default_cache_dir()


def _run(command: Sequence[str], *, timeout: float, what: str, env: Mapping[str, str] | None = None) -> str:
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
        raise SyftFlwrUnavailable(f"{what} failed: {exc}") from None
    output = done.stdout.decode("utf-8", "replace")
    if done.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise SyftFlwrUnavailable(f"{what} failed (exit {done.returncode}):\n{tail}")
    return output


def ensure_env(cache_dir: Path | None = None, *, pip_timeout_seconds: float = 1800.0) -> SyftFlwrEnv:
    """Create (once) and return the cached environment.

    The venv is created in place and marked complete only after the import check passes; a
    half-built one (interrupted run) is removed and built again. A file lock keeps concurrent
    runs from building the same one twice.
    """
    reqs = requirements()
    cache = cache_dir or _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SyftFlwrUnavailable(f"cannot create the cache folder {cache}: {exc}") from None
    key = env_key(reqs)
    venv = cache / key
    marker = venv / ".fl-orchestrator-ready"
    wanted = "\n".join(reqs)
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == wanted and (venv / "bin" / "python").exists():
            return SyftFlwrEnv(venv)
        shutil.rmtree(venv, ignore_errors=True)
        try:
            env = _build(venv, reqs, pip_timeout_seconds)
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)
            raise
        marker.write_text(wanted)
        return env


def _build(venv: Path, reqs: Sequence[str], pip_timeout_seconds: float) -> SyftFlwrEnv:
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120, what="python -m venv")
    env = SyftFlwrEnv(venv)
    # -I: neither the current folder nor PYTHON* variables leak into the environment's checks.
    pip = [str(env.python), "-I", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, *PIP_FLAGS, *reqs], timeout=pip_timeout_seconds, what=f"pip install {' '.join(reqs)}")
    check = (
        "import importlib.metadata as m, flwr, syft_flwr, syft_rpc, syft_event, syft_core;"
        "import watchfiles, structlog, msgpack, anyio, pytest;"
        "print(m.version('syft-flwr'), m.version('flwr'))"
    )
    versions = _run([str(env.python), "-I", "-c", check], timeout=300, what="importing syft_flwr").strip()
    if versions.splitlines()[-1:] != [f"{SYFT_FLWR_VERSION} {FLWR_VERSION}"]:
        raise SyftFlwrUnavailable(
            f"expected syft-flwr {SYFT_FLWR_VERSION} with flwr {FLWR_VERSION}, got {versions!r}"
        )
    return env


# --------------------------------------------------------------------------- the model


def load_template_model() -> Any:
    """The template's flt_app/model.py (numpy only), loaded by path: the initial model's source."""
    spec = importlib.util.spec_from_file_location("_flt_app_model", TEMPLATE_DIR / "flt_app" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def initial_model(extra_params: int = 0) -> dict[str, np.ndarray]:
    """The fixed initial model, by name: w0 (4, 3) and w1 (3,) float32, and w2 (extra_params,) if > 0.

    w2 only makes the messages bigger (for the comparison's --params); it is deterministic too.
    """
    arrays = load_template_model().default_arrays()
    model = dict(zip(ARRAY_NAMES, arrays, strict=True))
    if extra_params > 0:
        model["w2"] = ((np.arange(extra_params) % 7).astype(np.float32) - np.float32(3.0)) / np.float32(4.0)
    return model


@dataclass(frozen=True)
class DataOwnerSpec:
    """What one DO's ClientApp does: arrays + delta, weight num_examples, raise in fail_rounds."""

    email: str
    delta: float
    num_examples: int
    fail_rounds: tuple[int, ...] = ()

    def env(self) -> dict[str, str]:
        """The FLT_* variables that make the template's ClientApp behave so."""
        return {
            "FLT_DELTA": repr(self.delta),
            "FLT_NUM_EXAMPLES": str(self.num_examples),
            "FLT_FAIL_ROUNDS": ",".join(str(r) for r in self.fail_rounds),
            "FLT_NAME": self.email,
        }


def default_specs(count: int = 3, *, failing: int | None = 1, fail_round: int = 2) -> list[DataOwnerSpec]:
    """ds{i}@example.org with distinct deltas and weights; DO ``failing`` raises in ``fail_round``."""
    deltas = (0.25, -0.5, 1.0, 0.125, -2.0)
    return [
        DataOwnerSpec(
            email,
            deltas[i % len(deltas)],
            10 * (i + 1),
            (fail_round,) if failing == i else (),
        )
        for i, email in enumerate(site_emails(count))
    ]


def expected_models(
    initial: Mapping[str, np.ndarray], specs: Sequence[DataOwnerSpec], num_rounds: int
) -> list[dict[str, np.ndarray]]:
    """Round 0..num_rounds global models of sample-weighted FedAvg, computed by hand.

    In round r every DO that does not fail in r returns (model + delta) with weight
    num_examples; the average is taken in float64 and stored in the arrays' dtype.
    """
    model = {k: np.array(v) for k, v in initial.items()}
    out = [model]
    for rnd in range(1, num_rounds + 1):
        counted = [s for s in specs if rnd not in s.fail_rounds]
        total = sum(s.num_examples for s in counted)
        nxt = {}
        for name, value in model.items():
            acc = np.zeros(value.shape, dtype=np.float64)
            for spec in counted:
                update = (value + np.asarray(spec.delta, dtype=value.dtype)).astype(value.dtype)
                acc += update.astype(np.float64) * spec.num_examples
            nxt[name] = (acc / total).astype(value.dtype)
        model = nxt
        out.append(model)
    return out


def max_relative_error(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> float:
    """The largest |got - want| / max(1, |want|max) over all arrays (inf if names or shapes differ)."""
    if set(got) != set(want):
        return float("inf")
    worst = 0.0
    for name, value in want.items():
        if np.shape(got[name]) != np.shape(value):
            return float("inf")
        scale = max(1.0, float(np.max(np.abs(value))))
        diff = np.abs(np.asarray(got[name], dtype=np.float64) - np.asarray(value, dtype=np.float64))
        worst = max(worst, float(np.max(diff)) / scale)
    return worst


# --------------------------------------------------------------------------- federation


@dataclass
class Party:
    """One participant: an email, its syft_core config, its copy of the project, its DATA_DIR."""

    email: str
    folder: Path
    root: Path

    @property
    def config_path(self) -> Path:
        """The syft_core client config (SYFTBOX_CLIENT_CONFIG_PATH)."""
        return self.folder / "syftbox-config.json"

    @property
    def project_dir(self) -> Path:
        """This party's bootstrapped copy of the Flower app (main.py lives here)."""
        return self.folder / "project"

    @property
    def data_dir(self) -> Path:
        """DATA_DIR: syft-flwr requires it to exist; the test app does not read it."""
        return self.folder / "data"

    @property
    def home(self) -> Path:
        """HOME for its processes, so nothing lands in the real home folder."""
        return self.folder / "home"

    def write_config(self) -> None:
        """A syft_core config pointing at the shared root; the URLs are never contacted.

        No "path" key: SyftClientConfig.load passes the file's path itself and refuses a second.
        """
        for folder in (self.folder, self.data_dir, self.home):
            folder.mkdir(parents=True, exist_ok=True)
        config = {
            "email": self.email,
            "data_dir": str(self.root),
            "server_url": "http://127.0.0.1:9/",
            "client_url": "http://127.0.0.1:9/",
        }
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")


@dataclass
class ServerRun:
    """What one run of syft-flwr's own server left: exit code, times, the models per round."""

    exit_code: int | None
    seconds: float
    trace: list[dict[str, Any]]
    log_path: Path
    final_path: Path

    @property
    def round_seconds(self) -> list[float]:
        """Wall time of each round: between consecutive "after round" clock ticks."""
        ticks = [float(e["time"]) for e in self.trace if e.get("kind") == "round"]
        return [b - a for a, b in itertools.pairwise(ticks)]

    def models(self, names: Sequence[str] = ARRAY_NAMES) -> list[dict[str, np.ndarray]]:
        """The global model before round 1 and after each round (small models only: values traced)."""
        out = []
        for event in (e for e in self.trace if e.get("kind") == "round" and "values" in e):
            out.append(
                {
                    name: np.asarray(values, dtype=np.float64).reshape(shape)
                    for name, values, shape in zip(names, event["values"], event["shapes"], strict=True)
                }
            )
        return out

    def final_model(self) -> dict[str, np.ndarray] | None:
        """The ServerApp's final model (named as the initial .npz); None if no round aggregated."""
        try:
            with np.load(self.final_path, allow_pickle=False) as archive:
                model = {name: np.array(archive[name]) for name in archive.files}
        except (OSError, ValueError):
            return None
        return model or None

    def lost_reply_lines(self) -> list[str]:
        """Server log lines that say a reply was missing or unusable."""
        return grep(self.log_path, SERVER_LOST_REPLY_MARKERS)


@dataclass
class DaemonRun:
    """What one run of our daemon left: exit code, wall time and its JSON log events."""

    exit_code: int | None
    seconds: float
    events: list[dict[str, Any]]
    log_path: Path
    config_path: Path

    def named(self, name: str) -> list[dict[str, Any]]:
        """The events with that name."""
        return [e for e in self.events if e.get("event") == name]

    @property
    def completed(self) -> dict[int, dict[str, Any]]:
        """round.completed by round."""
        return {int(e["round"]): e for e in self.named("round.completed")}

    def log_tail(self, chars: int = 6000) -> str:
        """The end of the daemon's log, for failure messages."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return f"(no daemon log at {self.log_path})"


@dataclass
class Federation:
    """An aggregator and N data owners over one shared SyftBox root, one bootstrapped app."""

    env: SyftFlwrEnv
    workdir: Path
    app_name: str
    aggregator: Party
    data_owners: dict[str, Party]
    log_dir: Path
    model: dict[str, np.ndarray]
    owns_workdir: bool = True
    processes: ProcessSet = field(init=False)
    _do_processes: dict[str, ManagedProcess] = field(default_factory=dict)
    _closed: bool = False

    def __post_init__(self) -> None:
        self.processes = ProcessSet(self.log_dir)
        atexit.register(self.close)

    # ---- layout

    @property
    def root(self) -> Path:
        """The shared SyftBox root (every party's data_dir): it holds datasites/."""
        return self.workdir / "root"

    @property
    def trace_dir(self) -> Path:
        """Where the ClientApps and the ServerApp write their FLT_TRACE lines."""
        return self.workdir / "traces"

    @property
    def initial_npz(self) -> Path:
        """The initial model as .npz (w0, w1): the daemon's checkpoint and the ServerApp's start."""
        return self.workdir / "initial.npz"

    @property
    def emails(self) -> list[str]:
        """The DOs' emails, in order."""
        return list(self.data_owners)

    def rpc_dir(self, email: str) -> Path:
        """A DO's published RPC folder for this app."""
        return self.root / "datasites" / email / "app_data" / "flwr" / self.app_name / "rpc"

    def messages_dir(self, email: str) -> Path:
        """Where requests to a DO go: messages/<sender>/<uuid>.request (and its .response)."""
        return self.rpc_dir(email) / "messages"

    def trace_path(self, email: str) -> Path:
        """The ClientApp trace of one DO."""
        return self.trace_dir / f"client-{email}.jsonl"

    def do_log(self, email: str) -> Path:
        """One DO's stdout and stderr."""
        return self.log_dir / f"do-{email}.log"

    # ---- data owners

    def start_data_owner(
        self, spec: DataOwnerSpec, extra_env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        """Run the unmodified ``main.py`` as this DO (SYFT_FLWR_ENCRYPTION_ENABLED=false)."""
        party = self.data_owners[spec.email]
        env = self.env.process_env(
            party.home,
            {
                "SYFTBOX_CLIENT_CONFIG_PATH": str(party.config_path),
                "SYFT_FLWR_ENCRYPTION_ENABLED": "false",
                "DATA_DIR": str(party.data_dir),
                "FLT_TRACE": str(self.trace_path(spec.email)),
                **spec.env(),
                **(extra_env or {}),
            },
        )
        process = self.processes.start(
            f"do-{spec.email}", [str(self.env.python), "main.py"], env=env, cwd=party.project_dir
        )
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

    def client_trace(self, email: str) -> list[dict[str, Any]]:
        """The ClientApp's trace lines of one DO (one per train/evaluate call)."""
        return list(json_lines(self.trace_path(email)))

    def lost_reply_lines(self) -> dict[str, list[str]]:
        """Per DO, log lines that mean a request got no usable reply (400, 419, ...)."""
        return {email: grep(self.do_log(email), DO_LOST_REPLY_MARKERS) for email in self.data_owners}

    def rpc_files(self, email: str) -> list[Path]:
        """Every request and response file still under a DO's messages folder."""
        folder = self.messages_dir(email)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.rglob("*") if p.suffix in (".request", ".response"))

    def error_responses(self, email: str) -> list[dict[str, Any]]:
        """Response files still on disk whose status_code is 400 or more."""
        found = []
        for path in self.rpc_files(email):
            if path.suffix != ".response":
                continue
            try:
                response = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                found.append({"path": str(path), "status_code": None, "body": "(unreadable)"})
                continue
            if int(response.get("status_code", 200)) >= 400:
                found.append({"path": str(path), "status_code": response.get("status_code")})
        return found

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
            "syft_flwr": {"app_name": self.app_name},
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
        party = self.aggregator
        trace = self.trace_dir / f"{name}.jsonl"
        final = self.trace_dir / f"{name}-final.npz"
        trace.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        extra = {
            "SYFTBOX_CLIENT_CONFIG_PATH": str(party.config_path),
            "SYFT_FLWR_ENCRYPTION_ENABLED": "false",
            "DATA_DIR": str(party.data_dir),
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
        env = self.env.process_env(party.home, extra)
        started = time.monotonic()
        process = self.processes.start(
            name, [str(self.env.python), "main.py"], env=env, cwd=party.project_dir
        )
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
        home = self.workdir / "daemon-home"
        home.mkdir(parents=True, exist_ok=True)
        return self.processes.start(name, command, env=self.env.daemon_env(home), cwd=config_path.parent)

    def run_tool(
        self, args: Sequence[str], *, timeout_seconds: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """``fl-orchestrator ARGS`` with this environment's Python (a syft-flwr job needs flwr to load)."""
        home = self.workdir / "daemon-home"
        home.mkdir(parents=True, exist_ok=True)
        return subprocess.run(
            [str(self.env.python), "-m", "fl_orchestrator.cli.tool_main", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_seconds,
            check=False,
            cwd=self.workdir,
            env=self.env.daemon_env(home),
        )

    # ---- teardown and diagnosis

    def log_tails(self, lines: int = 30) -> str:
        """The end of every process's log, for failure messages."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            parts.append(f"--- {path.name} ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

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
) -> Federation:
    """Lay out one federation: shared root, configs, a bootstrapped project per party.

    The initial model is ``initial_model(extra_params)``, written to ``initial.npz``.

    Logs and traces stay in ``workdir`` (``log_dir`` may lie elsewhere); ``close`` removes the
    shared root and the parties' folders. ``app_name`` is the one bootstrap wrote.
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

    # Bootstrap once, then give every party its own copy (as each would have on its machine).
    source = work / "bootstrapped"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(TEMPLATE_DIR, source, ignore=shutil.ignore_patterns("__pycache__"))
    script = (
        "import sys, syft_flwr\n"
        "syft_flwr.bootstrap(\n"
        "    sys.argv[1], aggregator=sys.argv[2], datasites=sys.argv[3:], transport='syftbox'\n"
        ")\n"
    )
    _run(
        [str(env.python), "-I", "-c", script, str(source), aggregator, *dos],
        timeout=300,
        what="syft_flwr.bootstrap",
        env=env.process_env(work),
    )
    project = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))
    settings = project["tool"]["syft_flwr"]
    if settings.get("aggregator") != aggregator or settings.get("datasites") != dos:
        raise SyftFlwrUnavailable(f"bootstrap wrote unexpected [tool.syft_flwr]: {settings}")

    def party(email: str) -> Party:
        p = Party(email, parties_dir / email, root)
        p.write_config()
        shutil.copytree(source, p.project_dir, dirs_exist_ok=True)
        return p

    federation = Federation(
        env=env,
        workdir=work,
        app_name=str(settings["app_name"]),
        aggregator=party(aggregator),
        data_owners={email: party(email) for email in dos},
        log_dir=log_dir or work / "logs",
        model=initial_model(extra_params),
        owns_workdir=owns,
    )
    np.savez(federation.initial_npz, **federation.model)  # type: ignore[arg-type]
    return federation


# --------------------------------------------------------------------------- helpers


def _wait_exit(process: ManagedProcess, timeout_seconds: float) -> int | None:
    """Wait for a process to exit by itself; on overrun stop it and return None."""
    try:
        return process.popen.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        process.stop()
        return None


def json_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Every line of a file that parses as a JSON object (others are skipped)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            yield value


def grep(path: Path, needles: Sequence[str]) -> list[str]:
    """The lines of a file that contain any of the needles."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if any(n in line for n in needles)]


def run_venv_tests(env: SyftFlwrEnv, *, timeout_seconds: float = 300.0) -> subprocess.CompletedProcess[str]:
    """``<venv>/bin/python -m pytest -q tests/syftflwr`` from the repository root.

    Runs the tests that import flwr and syft_flwr: the codec and bridge tests beside this file
    and the contract tests in contract/. The folder is named syftflwr, not syft_flwr, so that
    with tests/ on sys.path it cannot shadow the installed ``syft_flwr``.
    """
    command = [
        str(env.python),
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        # syft_client (pulled by syft-flwr) warns about pydantic v1-style classes at import.
        "-W",
        "ignore::DeprecationWarning",
        str(HERE),
    ]
    home = Path(tempfile.mkdtemp(prefix="fl-syft-flwr-tests-"))
    try:
        return subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_seconds,
            check=False,
            cwd=REPO_ROOT,
            env=env.daemon_env(home),
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)


__all__ = [
    "ARRAY_NAMES",
    "REQUIRED_ENV",
    "SYFT_FLWR_VERSION",
    "DaemonRun",
    "DataOwnerSpec",
    "Federation",
    "ServerRun",
    "SyftFlwrEnv",
    "SyftFlwrUnavailable",
    "default_specs",
    "ensure_env",
    "expected_models",
    "grep",
    "initial_model",
    "json_lines",
    "make_federation",
    "max_relative_error",
    "run_venv_tests",
]
