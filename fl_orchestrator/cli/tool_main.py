"""`fl-orchestrator`: the datasite runner and the operator's tools."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog

from fl_orchestrator import __version__
from fl_orchestrator.cli import init_job
from fl_orchestrator.cli.logs import LoggingSetupError, configure_logging, resolve_logging
from fl_orchestrator.cli.report import ReportError, make_report
from fl_orchestrator.cli.status_view import show_status
from fl_orchestrator.config import EX_CONFIG, EX_USAGE, ConfigError, load_config
from fl_orchestrator.config.hooks import HookError
from fl_orchestrator.config.loader import _EMAIL, _JOB_NAME
from fl_orchestrator.datasite.runner import DatasiteRunner, RunnerSettings
from fl_orchestrator.storage.models import ModelFileError, ModelStore, export_npz
from fl_orchestrator.wire.parts import MIN_PART_BYTES

log = structlog.get_logger("fl_orchestrator.datasite")

EX_NOINPUT = 66
EX_CANTCREAT = 73


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EX_USAGE)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number > 0")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 (never split) or a positive size in bytes")
    return value


def _part_size(text: str) -> int:
    value = _non_negative_int(text)
    if 0 < value < MIN_PART_BYTES:
        raise argparse.ArgumentTypeError(
            f"{value}: expected 0 (never split) or at least {MIN_PART_BYTES} bytes"
        )
    return value


def _email(text: str) -> str:
    if not _EMAIL.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected an email like name@example.org")
    return text


def _node_setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. partition-id=0")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]  # a TOML scalar: 0, 1.5, true, "text"
    except tomllib.TOMLDecodeError:
        return key, value  # anything else is text


def _node_config(path: Path | None, values: list[tuple[str, Any]]) -> dict[str, Any]:
    """The data owner's node_config: the TOML file's scalars, then each KEY=VALUE flag."""
    config: dict[str, Any] = {}
    if path is not None:
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"--node-config {path}: {exc}") from None
        for key, value in table.items():
            if not isinstance(value, str | int | float | bool):
                raise ValueError(f"--node-config {path}: {key!r} must be a string, number or boolean")
            config[key] = value
    config.update(values)
    return config


def _job_name(text: str) -> str:
    if not _JOB_NAME.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1-64 of letters, digits, '.', '-', '_'")
    return text


def build_parser() -> argparse.ArgumentParser:
    """All subcommands."""
    parser = _Parser(prog="fl-orchestrator", description="fl-orchestrator tools.")
    parser.add_argument("--version", action="version", version=f"fl-orchestrator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    site = sub.add_parser("datasite", help="run the datasite side of a job")
    site.add_argument("--syftbox-root", required=True, type=Path)
    site.add_argument("--email", required=True, type=_email, help="this datasite's email")
    site.add_argument("--aggregator", required=True, type=_email, help="the aggregator's email")
    site.add_argument("--job", required=True, type=_job_name)
    code = site.add_mutually_exclusive_group(required=True)
    code.add_argument("--train", help="'package.module:function': train(arrays, config)")
    code.add_argument(
        "--client-app",
        help="'package.module:app': a Flower ClientApp (Message API) whose train and evaluate handlers"
        " run the tasks (needs flwr on this datasite)",
    )
    site.add_argument(
        "--node-config",
        type=Path,
        help="a TOML file of the data owner's own settings for the ClientApp's context.node_config",
    )
    site.add_argument(
        "--node-config-value",
        action="append",
        default=[],
        type=_node_setting,
        metavar="KEY=VALUE",
        help="one node_config setting (repeat; over the file's)",
    )
    site.add_argument(
        "--evaluate", default=None, help="'package.module:function' for federated evaluation (optional)"
    )
    site.add_argument(
        "--create",
        action="store_true",
        help="make --syftbox-root if it does not exist (by default a missing folder is an error:"
        " it is most likely the wrong one)",
    )
    site.add_argument(
        "--keep-running",
        action="store_true",
        help="serve on after the aggregator says the job has ended (by default: exit 0 then)",
    )
    site.add_argument("--heartbeat-interval-seconds", type=_positive_float, default=2.0)
    site.add_argument(
        "--part-bytes",
        type=_part_size,
        default=8 * 1024 * 1024,
        help="results larger than this are written as parts (0: never); SyftBox 0.4.0 refuses > 10 MB",
    )
    site.add_argument("--rescan-interval-seconds", type=_positive_float, default=10.0)
    site.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    site.add_argument("--log-format", choices=("auto", "json", "console"))

    export = sub.add_parser("export", help="write a round's global model as .npz")
    export.add_argument("--config", required=True, type=Path)
    export.add_argument("--round", type=int, default=None, help="round (default: the latest)")
    export.add_argument("--out", required=True, type=Path)
    export.add_argument("--force", action="store_true", help="overwrite --out if it exists")

    status = sub.add_parser(
        "status",
        help="show where a job is (reads <state_dir>/status.json; works while or after the daemon runs)",
    )
    status.add_argument("--config", required=True, type=Path)
    status.add_argument(
        "--json",
        action="store_true",
        help="one JSON object with stable keys (format fl-orchestrator.status/1)",
    )

    sim = sub.add_parser("simulate", help="run the whole job here, against N simulated datasites")
    sim.add_argument("--config", required=True, type=Path, help="the job file, as for the live federation")
    sim.add_argument("--datasites", required=True, type=int, help="how many datasites to simulate")
    sim_code = sim.add_mutually_exclusive_group(required=True)
    sim_code.add_argument("--train", help="'package.module:function', as each datasite runs it")
    sim_code.add_argument("--client-app", help="'package.module:app', a Flower ClientApp (needs flwr)")
    sim.add_argument("--evaluate", help="'package.module:function' for federated evaluation")
    sim.add_argument(
        "--partition",
        help="'package.module:function': partition(partition_id, num_partitions) -> node_config settings"
        " giving each datasite its share of the data",
    )
    sim.add_argument("--slow", type=int, default=0, help="this many datasites answer after the round timeout")
    sim.add_argument("--flaky", type=int, default=0, help="this many datasites fail in every even round")
    sim.add_argument("--seed", type=int, default=0, help="which datasites are slow or flaky")
    sim.add_argument("--workdir", type=Path, help="default: a new temporary folder")
    sim.add_argument("--report", type=Path, help="the PNG report (default: WORKDIR/report.png)")

    report = sub.add_parser(
        "report", help="plot training curves and participation per round as a PNG (needs matplotlib)"
    )
    report.add_argument("--config", required=True, type=Path)
    report.add_argument("--out", required=True, type=Path, help="PNG file to write")

    init = sub.add_parser("init", help="write a starter job file, validated like the daemon does")
    init_job.add_arguments(init)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "datasite":
        return _datasite(args)
    if args.command == "init":
        return _init(args)
    if args.command == "simulate":
        return _simulate(args)
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
                    config.state.state_dir, args.out, job=config.job.name, num_rounds=config.job.num_rounds
                )
            )
        except ReportError as exc:
            print(str(exc), file=sys.stderr)
            return exc.exit_code
        return 0
    code, text = show_status(config.state.state_dir, as_json=args.json)
    print(text, file=sys.stdout if code == 0 else sys.stderr)
    return code


def _simulate(args: argparse.Namespace) -> int:
    from fl_orchestrator.simulate.job import SimulationRefused
    from fl_orchestrator.simulate.run import SimulateSettings, simulate

    settings = SimulateSettings(
        config=args.config,
        datasites=args.datasites,
        train=args.train,
        client_app=args.client_app,
        evaluate=args.evaluate,
        partition=args.partition,
        slow=args.slow,
        flaky=args.flaky,
        seed=args.seed,
        workdir=args.workdir,
    )
    try:
        result = simulate(settings)
    except ConfigError as exc:
        print(exc.line(), file=sys.stderr)
        return EX_CONFIG
    except (SimulationRefused, HookError, ValueError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return EX_USAGE
    out = args.report or result.workdir / "report.png"
    try:
        print(f"report: {make_report(result.state_dir, out, job=result.job, num_rounds=result.num_rounds)}")
    except ReportError as exc:
        print(f"report: skipped ({exc})")
    return result.code


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


def _datasite(args: argparse.Namespace) -> int:
    try:
        level, fmt = resolve_logging(args.log_level, args.log_format)
    except LoggingSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_USAGE
    configure_logging(level, fmt)
    try:
        node_config = _node_config(args.node_config, args.node_config_value)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_USAGE
    root = Path(os.path.abspath(args.syftbox_root))
    if not root.is_dir():
        if not args.create:
            print(
                f"error: --syftbox-root {root} does not exist: point it at the SyftBox client's folder"
                " (the one that holds datasites/), or pass --create to make it",
                file=sys.stderr,
            )
            return EX_NOINPUT
        root.mkdir(parents=True, exist_ok=True)
    settings = RunnerSettings(
        # Absolute from the start: a relative root silently disabled file events (only the rescan saw tasks).
        root=root,
        email=args.email,
        aggregator=args.aggregator,
        job=args.job,
        train=args.train,
        evaluate=args.evaluate,
        client_app=args.client_app,
        node_config=node_config,
        keep_running=args.keep_running,
        part_bytes=args.part_bytes,
        heartbeat_interval_seconds=args.heartbeat_interval_seconds,
        rescan_interval_seconds=args.rescan_interval_seconds,
    )
    try:
        runner = DatasiteRunner(settings)
    except HookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_USAGE
    try:
        anyio.run(_serve, runner)
    except KeyboardInterrupt:
        return 0
    return 0


async def _serve(runner: DatasiteRunner) -> None:
    """The runner until its job ends, or until SIGTERM/SIGINT (the task in hand is then abandoned)."""
    async with anyio.create_task_group() as group:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for number in signals:
                    # A task abandoned here has no result yet: it is answered again after a restart.
                    log.info(
                        "datasite.stopped",
                        datasite=runner.settings.email,
                        signal=signal.Signals(number).name,
                        abandoned_task=runner.current_task,
                    )
                    group.cancel_scope.cancel()
                    return

        group.start_soon(stop_on_signal)
        await runner.run()
        log.info("datasite.stopped", datasite=runner.settings.email, reason="the job has ended")
        group.cancel_scope.cancel()


def run() -> None:
    """Console-script wrapper."""
    sys.exit(main())


if __name__ == "__main__":
    run()
