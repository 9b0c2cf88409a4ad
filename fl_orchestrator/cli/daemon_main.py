"""`fl-orchestratord --config job.toml`: the aggregation service."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog

from fl_orchestrator import __version__
from fl_orchestrator.config import EX_CONFIG, ConfigError, load_config
from fl_orchestrator.config.render import config_to_table
from fl_orchestrator.logs import LoggingSetupError, configure_logging, resolve_logging
from fl_orchestrator.service.sdnotify import SystemdNotifier
from fl_orchestrator.shell.daemon import EXIT_SOFTWARE, Daemon
from fl_orchestrator.shell.hooks import HookError
from fl_orchestrator.shell.models import ModelFileError
from fl_orchestrator.shell.persistence import EX_IOERR, StartRefused, StateWriteError

EX_USAGE = 64


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2; sysexits says 64 for usage
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EX_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The daemon's flags."""
    parser = _Parser(prog="fl-orchestratord", description="Federated-learning aggregation service.")
    parser.add_argument("--config", required=True, type=Path, help="job file (TOML)")
    parser.add_argument("--check", action="store_true", help="validate, print the resolved config, exit")
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="start a new run of a job whose state folder holds an earlier run (archived, not overwritten)",
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", choices=("auto", "json", "console"))
    parser.add_argument("--version", action="version", version=f"fl-orchestrator {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
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
    if args.check:
        print(json.dumps(config_to_table(config), indent=2, sort_keys=True))
        return 0
    configure_logging(level, fmt)
    log = structlog.get_logger("fl_orchestrator.main")
    try:
        daemon = Daemon(config, notifier=SystemdNotifier.from_environment(), rerun=args.rerun)
    except HookError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    try:
        return anyio.run(daemon.run)
    except ModelFileError as exc:
        print(f"config error: model.checkpoint_path: {exc}", file=sys.stderr)
        return EX_CONFIG
    except StartRefused as exc:
        print(f"state error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except StateWriteError as exc:
        log.error("daemon.state_unwritable", error=str(exc))
        return EX_IOERR
    except KeyboardInterrupt:
        return 130
    except Exception:
        log.exception("daemon.crashed")
        return EXIT_SOFTWARE


def run() -> None:
    """Console-script wrapper."""
    sys.exit(main())


if __name__ == "__main__":
    run()
