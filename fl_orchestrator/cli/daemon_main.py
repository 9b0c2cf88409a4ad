"""`fl-orchestratord --config job.toml`: the aggregation service."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog

from fl_orchestrator import __version__
from fl_orchestrator.cli.logs import LoggingSetupError, configure_logging, resolve_logging
from fl_orchestrator.config import EX_CANTCREAT, EX_CONFIG, EX_USAGE, ConfigError, load_config
from fl_orchestrator.config.hooks import HookError, load_callable, use_python_path
from fl_orchestrator.config.render import config_to_table
from fl_orchestrator.config.schema import JobConfig
from fl_orchestrator.daemon.lifecycle import EXIT_SOFTWARE, Daemon
from fl_orchestrator.daemon.sdnotify import SystemdNotifier
from fl_orchestrator.daemon.size_check import size_problems
from fl_orchestrator.storage.job_state import StartRefused
from fl_orchestrator.storage.lock import EX_TEMPFAIL, LockHeld
from fl_orchestrator.storage.models import ModelFileError, initial_model
from fl_orchestrator.storage.retry import EX_IOERR, StateWriteError
from fl_orchestrator.wire.messages import model_spec


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2; sysexits says 64 for usage
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EX_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The daemon's flags."""
    parser = _Parser(prog="fl-orchestratord", description="Federated-learning aggregation service.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", type=Path, help="job file (TOML)")
    what.add_argument(
        "--server-app",
        type=Path,
        metavar="PROJECT_DIR",
        help="run a bootstrapped syft-flwr project's own main(grid, context) ServerApp on our transport",
    )
    parser.add_argument("--syftbox-root", type=Path, help="with --server-app: the SyftBox folder (~/SyftBox)")
    parser.add_argument(
        "--state-dir", type=Path, help="with --server-app: the state folder (PROJECT_DIR/.fl-orchestrator)"
    )
    parser.add_argument(
        "--no-encryption",
        action="store_true",
        help="with --server-app: every owner runs with SYFT_FLWR_ENCRYPTION_ENABLED=false",
    )
    parser.add_argument("--check", action="store_true", help="validate, print the resolved config, exit")
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="start a new run of a job whose state folder holds an earlier run (archived, not overwritten)",
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", choices=("auto", "json", "console"))
    parser.add_argument(
        "--log-file",
        type=Path,
        help="also append every event as a JSON line here; the console keeps its format",
    )
    parser.add_argument("--version", action="version", version=f"fl-orchestrator {__version__}")
    return parser


def main(argv: Sequence[str] | None = None, *, stop_requests: list[int] | None = None) -> int:
    """Entry point; returns the exit code.

    ``stop_requests`` collects SIGTERM/SIGINT that arrived before the daemon
    listens for them (cli/daemon_entry.py); the daemon stops at once if any did.
    """
    args = build_parser().parse_args(argv)
    if args.server_app is not None:
        return _server_app(args)
    try:
        config = load_config(args.config)
        level, fmt = resolve_logging(
            args.log_level, args.log_format, config.logging.level, config.logging.format
        )
    except ConfigError as exc:
        print(exc.line(), file=sys.stderr)
        return EX_CONFIG
    except LoggingSetupError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    use_python_path(config.job.python_path)  # before anything imports the job's own modules
    refused = _sizes_refused(config) or _not_ready(config)
    if refused is not None:
        print(refused, file=sys.stderr)
        return EX_CONFIG
    if args.check:
        print(json.dumps(config_to_table(config), indent=2, sort_keys=True))
        return 0
    try:
        configure_logging(level, fmt, log_file=_absolute(args.log_file))
    except OSError as exc:
        print(f"error: --log-file {args.log_file}: {exc.strerror or exc}", file=sys.stderr)
        return EX_CANTCREAT
    log = structlog.get_logger("fl_orchestrator.main")
    try:
        daemon = Daemon(
            config,
            notifier=SystemdNotifier.from_environment(),
            rerun=args.rerun,
            stop_requests=stop_requests,
        )
    except HookError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    if config.job.role == "region":
        from fl_orchestrator.tiers.region import make_region

        make_region(daemon)
    try:
        return anyio.run(daemon.run)
    except LockHeld as exc:
        print(f"state error: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except ModelFileError as exc:
        print(f"config error: model.checkpoint_path: {exc}", file=sys.stderr)
        return EX_CONFIG
    except StartRefused as exc:
        print(f"state error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if _only(exc, StateWriteError):
            # state.write_gave_up already named the path and the errno; the run is not
            # marked failed, so a restart once the disk is writable resumes it.
            log.info("daemon.exiting", exit_code=EX_IOERR, hint="fix the storage, then start again to resume")
            return EX_IOERR
        log.exception("daemon.crashed")
        return EXIT_SOFTWARE


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(os.path.abspath(os.path.expanduser(path)))


def _server_app(args: argparse.Namespace) -> int:
    from fl_orchestrator.daemon.server_app import ServerAppSettings, run_server_app

    try:
        level, fmt = resolve_logging(args.log_level, args.log_format)
    except LoggingSetupError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    try:
        configure_logging(level, fmt, log_file=_absolute(args.log_file))
    except OSError as exc:
        print(f"error: --log-file {args.log_file}: {exc.strerror or exc}", file=sys.stderr)
        return EX_CANTCREAT
    project = Path(os.path.abspath(args.server_app))
    settings = ServerAppSettings(
        project=project,
        syftbox_root=Path(os.path.abspath(os.path.expanduser(args.syftbox_root or "~/SyftBox"))),
        state_dir=Path(os.path.abspath(args.state_dir or project / ".fl-orchestrator")),
        encryption=not args.no_encryption,
    )
    try:
        return anyio.run(run_server_app, settings)
    except LockHeld as exc:
        print(f"state error: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except KeyboardInterrupt:
        return 130


def _not_ready(config: JobConfig) -> str | None:
    """What would stop the job once running, found now: hooks, the state folder, the SyftBox root.

    ``--check`` does everything but run: a typo in a hook fails here, not at round 1.
    """
    problems = []
    for key, name in (
        ("evaluate.global_evaluate", config.evaluate.global_evaluate),
        ("job.configure_round", config.job.configure_round),
        ("job.metrics_aggregation", config.job.metrics_aggregation),
    ):
        if name:
            try:
                load_callable(name, what=key)
            except HookError as exc:
                problems.append(str(exc))
    for key, folder, need in (
        ("state.state_dir", config.state.state_dir, "writable"),
        ("syftbox.root", config.syftbox.root, "readable"),
    ):
        # A folder that is not there yet is made at start: its nearest existing parent must take it.
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if existing != folder:
            need = "writable"
        mode = os.W_OK | os.X_OK if need == "writable" else os.R_OK | os.X_OK
        if not existing.is_dir():
            problems.append(f"{key} = {folder}: {existing} is not a folder")
        elif not os.access(existing, mode):
            problems.append(f"{key} = {folder}: {existing} is not {need} by this user (uid {os.getuid()})")
    return "\n".join(f"config error: {problem}" for problem in problems) if problems else None


def _sizes_refused(config: JobConfig) -> str | None:
    """Why the job's files would not travel or be read, as config error lines; None if they would."""
    try:
        spec = model_spec(initial_model(config.model))
    except ModelFileError as exc:
        return f"config error: model.checkpoint_path: {exc}"
    problems = size_problems(config, spec)
    return "\n".join(f"config error: {problem}" for problem in problems) if problems else None


def _only(exc: BaseException, kind: type[BaseException]) -> bool:
    """True if exc is a kind, or an exception group whose every leaf is one."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(inner, kind) for inner in exc.exceptions)
    return isinstance(exc, kind)


if __name__ == "__main__":
    sys.exit(main())
