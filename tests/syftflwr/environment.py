"""The cached syft-flwr environment: a venv of its own, built once, and how to run Python in it.

``ensure_env`` installs PyPI's ``syft-flwr`` (pinned; it pulls flwr 1.25.0, syft-rpc,
syft-event and syft-core) into a virtual environment of its own, together with the daemon's
own dependencies and pytest. It is cached under ``~/.cache/fl-orchestrator-tests/`` (or
``$FL_SYFT_FLWR_CACHE``), keyed by the requirement list, never in the project's ``.venv``
(flwr pins ``pathspec<0.13``, which breaks the project's mypy) and never with the repository's
path inside it. It raises ``SyftFlwrUnavailable`` with the reason when that fails, so the
tests can skip saying why (``env_or_skip``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from syftbox.harness import SyftBoxEnv, default_cache_dir
from syftbox.harness import run_checked as syftbox_run_checked

SYFT_FLWR_VERSION = "0.5.3"
FLWR_VERSION = "1.25.0"
CACHE_ENV = "FL_SYFT_FLWR_CACHE"
REQUIRED_ENV = "FL_SYFT_FLWR_REQUIRED"
# syft-flwr 0.5.3 declares Requires-Python >= 3.12 but runs on 3.11; without --only-binary
# pip tries to build numpy from source for 3.11 and fails.
PIP_FLAGS = ("--only-binary", ":all:", "--ignore-requires-python")
TEST_REQUIREMENTS = ("pytest>=8", "hypothesis>=6.100")

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
TEMPLATE_DIR = HERE / "app_template"


class SyftFlwrUnavailable(RuntimeError):
    """syft-flwr could not be installed or run here; the message says why."""


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
        """Environment for a syft-flwr process: none of the caller's Python or SyftBox settings.

        The syftbox harness's environment (venv first on PATH, HOME of its own, no PYTHONPATH,
        PYTHONHOME, VIRTUAL_ENV or SYFTBOX_*), without syft-flwr's, the template's or the
        daemon's settings either, and with loguru's colours off.
        """
        env = {
            k: v
            for k, v in SyftBoxEnv(self.venv).process_env(home).items()
            if k != "PYTHONSTARTUP" and not k.startswith(("SYFT_FLWR_", "FLT_", "FL_ORCHESTRATOR_"))
        }
        env["LOGURU_COLORIZE"] = "false"
        env.update(extra or {})
        return env

    def daemon_env(self, home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for the daemon run by this interpreter: the repository on PYTHONPATH."""
        env = self.process_env(home, extra)
        env["PYTHONPATH"] = str(REPO_ROOT)
        return env

    def run_python(
        self, args: Sequence[str], *, cwd: Path, home: Path, timeout_seconds: float
    ) -> subprocess.CompletedProcess[str]:
        """``<venv>/bin/python ARGS`` to completion in ``daemon_env(home)``, stdout and stderr as text."""
        return subprocess.run(
            [str(self.python), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_seconds,
            check=False,
            cwd=cwd,
            env=self.daemon_env(home),
        )


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return default_cache_dir()


def run_checked(
    command: Sequence[str], *, timeout: float, what: str, env: Mapping[str, str] | None = None
) -> str:
    """Run a command to completion and return its output; SyftFlwrUnavailable (with its tail) if it fails."""
    return syftbox_run_checked(command, timeout=timeout, what=what, env=env, unavailable=SyftFlwrUnavailable)


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
    run_checked([sys.executable, "-m", "venv", str(venv)], timeout=120, what="python -m venv")
    env = SyftFlwrEnv(venv)
    # -I: neither the current folder nor PYTHON* variables leak into the environment's checks.
    pip = [str(env.python), "-I", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run_checked([*pip, *PIP_FLAGS, *reqs], timeout=pip_timeout_seconds, what=f"pip install {' '.join(reqs)}")
    check = (
        "import importlib.metadata as m, flwr, syft_flwr, syft_rpc, syft_event, syft_core;"
        "import watchfiles, structlog, msgpack, anyio, pytest;"
        "print(m.version('syft-flwr'), m.version('flwr'))"
    )
    versions = run_checked(
        [str(env.python), "-I", "-c", check], timeout=300, what="importing syft_flwr"
    ).strip()
    if versions.splitlines()[-1:] != [f"{SYFT_FLWR_VERSION} {FLWR_VERSION}"]:
        raise SyftFlwrUnavailable(
            f"expected syft-flwr {SYFT_FLWR_VERSION} with flwr {FLWR_VERSION}, got {versions!r}"
        )
    return env


def env_or_skip() -> SyftFlwrEnv:
    """``ensure_env()`` for a test: skip it, saying why, when the environment cannot be made.

    With ``FL_SYFT_FLWR_REQUIRED`` set (``make test-syft-flwr``) the test fails instead.
    """
    import pytest  # only a test asks for this; the comparison script runs without pytest

    try:
        return ensure_env()
    except SyftFlwrUnavailable as exc:
        message = f"syft-flwr {SYFT_FLWR_VERSION} could not be installed in its own environment: {exc}"
        if os.environ.get(REQUIRED_ENV):
            pytest.fail(message)
        pytest.skip(message)


def run_venv_tests(env: SyftFlwrEnv, *, timeout_seconds: float = 300.0) -> subprocess.CompletedProcess[str]:
    """``<venv>/bin/python -m pytest -q tests/syftflwr`` from the repository root.

    Runs the tests that import flwr and syft_flwr: the codec and adapter tests beside this file
    and the contract tests in contract/. The folder is named syftflwr, not syft_flwr, so that
    with tests/ on sys.path it cannot shadow the installed ``syft_flwr``.
    """
    args = [
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
        return env.run_python(args, cwd=REPO_ROOT, home=home, timeout_seconds=timeout_seconds)
    finally:
        shutil.rmtree(home, ignore_errors=True)
