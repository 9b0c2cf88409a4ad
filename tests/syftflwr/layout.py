"""Where everything of one federation lies, and what the processes left there.

ONE shared SyftBox root (``<work>/root``, holding ``datasites/<email>/``) instead of a sync;
per party (``<work>/parties/<email>/``) a syft_core config, a DATA_DIR, a HOME and a copy of
``app_template/`` bootstrapped with ``syft_flwr.bootstrap(..., transport="syftbox")`` (which
writes ``[tool.syft_flwr]`` with a fresh ``app_name`` and ``main.py``); the ClientApps' and
ServerApp's traces in ``<work>/traces``; the processes' logs in ``log_dir``. Nothing here
starts a process except ``bootstrap_app``, which runs ``syft_flwr.bootstrap`` in the venv.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.records import json_lines
from syftflwr.environment import TEMPLATE_DIR, SyftFlwrEnv, SyftFlwrUnavailable, run_checked
from syftflwr.records import DO_LOST_REPLY_MARKERS, grep


@dataclass
class Party:
    """One participant: an email, its syft_core config, its copy of the project, its DATA_DIR."""

    email: str
    folder: Path
    root: Path
    # syft-flwr's default: on. Off runs main.py with SYFT_FLWR_ENCRYPTION_ENABLED=false.
    encryption: bool = True

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

    def main_py_env(self) -> dict[str, str]:
        """What the bootstrapped ``main.py`` needs to run as this party (no variable for encryption on)."""
        env = {"SYFTBOX_CLIENT_CONFIG_PATH": str(self.config_path), "DATA_DIR": str(self.data_dir)}
        if not self.encryption:
            env["SYFT_FLWR_ENCRYPTION_ENABLED"] = "false"
        return env


@dataclass
class FederationLayout:
    """An aggregator and N data owners over one shared SyftBox root, one bootstrapped app: the files."""

    workdir: Path
    app_name: str
    aggregator: Party
    data_owners: dict[str, Party]
    log_dir: Path

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

    # ---- what the processes left

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


LEGACY_COMPONENTS = ("flt_app.legacy_server_app:app", "flt_app.legacy_client_app:app")


def bootstrap_app(
    env: SyftFlwrEnv,
    work: Path,
    aggregator: str,
    data_owners: list[str],
    components: tuple[str, str] | None = None,
) -> tuple[Path, str]:
    """Copy ``app_template/`` to ``work/bootstrapped``, run ``syft_flwr.bootstrap`` on it there.

    ``components`` (serverapp, clientapp) replaces the template's, e.g. ``LEGACY_COMPONENTS``:
    the same app written with ``server_fn`` and a NumPyClient.

    Returns that folder and the ``app_name`` bootstrap wrote into its ``[tool.syft_flwr]``
    (SyftFlwrUnavailable if that table names other parties).
    """
    source = work / "bootstrapped"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(TEMPLATE_DIR, source, ignore=shutil.ignore_patterns("__pycache__"))
    if components is not None:
        pyproject = source / "pyproject.toml"
        text = pyproject.read_text(encoding="utf-8")
        text = text.replace('serverapp = "flt_app.server_app:app"', f'serverapp = "{components[0]}"')
        text = text.replace('clientapp = "flt_app.client_app:app"', f'clientapp = "{components[1]}"')
        pyproject.write_text(text, encoding="utf-8")
    script = (
        "import sys, syft_flwr\n"
        "syft_flwr.bootstrap(\n"
        "    sys.argv[1], aggregator=sys.argv[2], datasites=sys.argv[3:], transport='syftbox'\n"
        ")\n"
    )
    run_checked(
        [str(env.python), "-I", "-c", script, str(source), aggregator, *data_owners],
        timeout=300,
        what="syft_flwr.bootstrap",
        env=env.process_env(work),
    )
    project = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))
    settings = project["tool"]["syft_flwr"]
    if settings.get("aggregator") != aggregator or settings.get("datasites") != data_owners:
        raise SyftFlwrUnavailable(f"bootstrap wrote unexpected [tool.syft_flwr]: {settings}")
    return source, str(settings["app_name"])
