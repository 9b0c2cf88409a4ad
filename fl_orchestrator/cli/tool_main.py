"""`fl-orchestrator`: the datasite runner and the operator's tools."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from fl_orchestrator import __version__
from fl_orchestrator.cli import init_job
from fl_orchestrator.cli.datasite_cmd import (
    EX_NOINPUT,
    add_datasite_parser,
    run_datasite,
)
from fl_orchestrator.cli.report import ReportError, make_report
from fl_orchestrator.cli.simulate_cmd import add_simulate_parser, run_simulate
from fl_orchestrator.cli.status_view import show_status
from fl_orchestrator.cli.status_watch import watch_status
from fl_orchestrator.config import EX_CONFIG, EX_USAGE, ConfigError, load_config
from fl_orchestrator.storage.models import ModelFileError, ModelStore, export_npz

log = structlog.get_logger("fl_orchestrator.datasite")

EX_CANTCREAT = 73


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EX_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """All subcommands."""
    parser = _Parser(prog="fl-orchestrator", description="fl-orchestrator tools.")
    parser.add_argument("--version", action="version", version=f"fl-orchestrator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_datasite_parser(sub)

    export = sub.add_parser("export", help="write a round's global model as .npz")
    export.add_argument("--config", required=True, type=Path)
    export.add_argument("--round", type=int, default=None, help="round (default: the latest)")
    export.add_argument("--out", required=True, type=Path)
    export.add_argument("--force", action="store_true", help="overwrite --out if it exists")

    status = sub.add_parser(
        "status",
        help="show where a job is (reads <state_dir>/status.json; works while or after the daemon runs)",
    )
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="the job file (its state_dir holds status.json)")
    where.add_argument(
        "--state-dir", type=Path, help="the state folder itself (for fl-orchestratord --server-app)"
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="one JSON object with stable keys (format fl-orchestrator.status/1)",
    )
    status.add_argument(
        "--watch",
        action="store_true",
        help="keep the view current until the job ends (exit 0 done, 1 failed); one line per change"
        " when stdout is not a terminal",
    )
    status.add_argument(
        "--interval-seconds",
        type=_positive_seconds,
        default=None,
        help="with --watch: how often to check status.json and redraw (default 1.0)",
    )

    report = sub.add_parser(
        "report",
        help="plot evaluation and training curves and who took part, per round and per datasite,"
        " as a PNG (needs matplotlib)",
    )
    report.add_argument("--config", required=True, type=Path)
    report.add_argument("--out", required=True, type=Path, help="PNG file to write")
    report.add_argument("--force", action="store_true", help="overwrite --out if it exists")

    add_simulate_parser(sub)
    init = sub.add_parser("init", help="write a starter job file, validated like the daemon does")
    init_job.add_arguments(init)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "datasite":
        return run_datasite(args)
    if args.command == "init":
        return _init(args)
    if args.command == "simulate":
        return run_simulate(args)
    if args.command == "status" and args.state_dir is not None:
        return _status(args, args.state_dir)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc.line(), file=sys.stderr)
        return EX_CONFIG
    if args.command == "export":
        store = ModelStore(config.state.state_dir, config.job.name)
        rounds = store.rounds()
        if not rounds:
            print(f"no saved models in {store.directory}", file=sys.stderr)
            return EX_NOINPUT
        rnd = rounds[-1] if args.round is None else args.round
        if rnd not in rounds:
            print(f"round {rnd} has no saved model; saved rounds: {rounds[0]}..{rounds[-1]}", file=sys.stderr)
            return EX_NOINPUT
        if args.out.exists() and not args.force:
            print(f"export: {args.out} exists; pass --force to overwrite it", file=sys.stderr)
            return EX_CANTCREAT
        try:
            export_npz(store.load(rnd), args.out)
        except ModelFileError as exc:
            print(f"cannot export: {exc}", file=sys.stderr)
            return EX_NOINPUT
        print(str(args.out))
        return 0
    if args.command == "report":
        try:
            print(
                make_report(
                    config.state.state_dir,
                    args.out,
                    job=config.job.name,
                    num_rounds=config.job.num_rounds,
                    force=args.force,
                )
            )
        except ReportError as exc:
            print(str(exc), file=sys.stderr)
            return exc.exit_code
        return 0
    return _status(args, config.state.state_dir)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _screen() -> tuple[int, int]:
    size = shutil.get_terminal_size()  # read at every redraw: the window may be resized
    return size.columns, size.lines


def _status(args: argparse.Namespace, state_dir: Path) -> int:
    if args.watch and args.json:
        # A stream of documents would break every consumer of the one-object format.
        print("fl-orchestrator status: error: --json cannot be combined with --watch", file=sys.stderr)
        return EX_USAGE
    if args.interval_seconds is not None and not args.watch:
        print("fl-orchestrator status: error: --interval-seconds needs --watch", file=sys.stderr)
        return EX_USAGE
    if args.watch:
        return watch_status(
            state_dir,
            out=sys.stdout,
            tty=sys.stdout.isatty(),
            interval=args.interval_seconds or 1.0,
            clock=time.time,
            sleep=time.sleep,
            screen=_screen,
        )
    code, text = show_status(state_dir, as_json=args.json)
    print(text, file=sys.stdout if code == 0 else sys.stderr)
    return code


def _init(args: argparse.Namespace) -> int:
    missing = init_job.missing_flags(args)
    if missing:
        print(f"fl-orchestrator init: error: missing {', '.join(missing)}", file=sys.stderr)
        return EX_USAGE
    if args.from_syft_flwr is not None:
        return _init_from_syft_flwr(args)
    try:
        out = init_job.write_job_file(args)
    except ConfigError as exc:
        print(exc.line(), file=sys.stderr)
        return EX_CONFIG
    except FileExistsError as exc:
        print(f"init: {exc}", file=sys.stderr)
        return init_job.EX_CANTCREAT
    except OSError as exc:
        print(f"init: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return init_job.EX_CANTCREAT
    print(str(out))
    return 0


def _init_from_syft_flwr(args: argparse.Namespace) -> int:
    from fl_orchestrator.cli.init_syft_flwr import report, write_from_project
    from fl_orchestrator.protocols.syft_flwr.project_import import ImportRefused

    try:
        out, translation = write_from_project(args)
    except ImportRefused as exc:
        print(f"init: cannot translate {args.from_syft_flwr}: {exc}", file=sys.stderr)
        return EX_CONFIG
    except ConfigError as exc:
        print(exc.line(), file=sys.stderr)
        return EX_CONFIG
    except (FileExistsError, OSError) as exc:
        print(f"init: {exc}", file=sys.stderr)
        return init_job.EX_CANTCREAT
    print(report(out, translation))
    return 0


def run() -> None:
    """Console-script wrapper."""
    sys.exit(main())


if __name__ == "__main__":
    run()
