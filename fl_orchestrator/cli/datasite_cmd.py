"""`fl-orchestrator datasite`: the data owner's runner, and the pool of simulated runners.

Flags become ``RunnerSettings``; the runner serves until its job ends or a
signal arrives. ``datasite-pool`` (hidden: ``simulate`` starts it) serves many
simulated datasites in one process (simulate/pool.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import structlog

from fl_orchestrator.cli.logs import LoggingSetupError, configure_logging, resolve_logging
from fl_orchestrator.config import EX_USAGE
from fl_orchestrator.config.hooks import HookError
from fl_orchestrator.config.loader import _EMAIL, _JOB_NAME
from fl_orchestrator.datasite.runner import DatasiteRunner, RunnerSettings
from fl_orchestrator.wire.parts import MIN_PART_BYTES

log = structlog.get_logger("fl_orchestrator.datasite")

EX_NOINPUT = 66


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


def node_setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. partition-id=0")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]  # a TOML scalar: 0, 1.5, true, "text"
    except tomllib.TOMLDecodeError:
        return key, value  # anything else is text


def node_config_of(path: Path | None, values: list[tuple[str, Any]]) -> dict[str, Any]:
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


def add_datasite_parser(sub: Any) -> None:
    """The ``datasite`` subcommand's flags."""
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
        type=node_setting,
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
    site.add_argument(
        "--waiting-log-interval-seconds",
        type=_positive_float,
        default=300.0,
        help="until the first task, say what the runner waits for this often (and at start)",
    )
    site.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    site.add_argument("--log-format", choices=("auto", "json", "console"))


def pool_main(argv: list[str] | None = None) -> int:
    """``python -m fl_orchestrator.cli.datasite_cmd --spec FILE``: simulate's pool of datasites.

    Not a subcommand people type: ``simulate`` starts it (simulate/federation.py).
    """
    from fl_orchestrator.simulate.pool import PoolSpec, RunnerPool

    parser = argparse.ArgumentParser(prog="fl-orchestrator-datasite-pool")
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", choices=("auto", "json", "console"))
    args = parser.parse_args(argv)
    if not _configure(args):
        return EX_USAGE
    try:
        pool = RunnerPool(PoolSpec.read(args.spec))
    except (OSError, ValueError, TypeError, HookError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_USAGE
    anyio.run(_until_signal, pool.run, lambda name: log.info("simulate.pool_stopped", signal=name))
    return 0


def _configure(args: argparse.Namespace) -> bool:
    try:
        level, fmt = resolve_logging(args.log_level, args.log_format)
    except LoggingSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    configure_logging(level, fmt)
    return True


def run_datasite(args: argparse.Namespace) -> int:
    """Serve one datasite until its job ends (exit 0) or SIGTERM/SIGINT."""
    if not _configure(args):
        return EX_USAGE
    try:
        node_config = node_config_of(args.node_config, args.node_config_value)
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
        waiting_log_interval_seconds=args.waiting_log_interval_seconds,
    )
    # The data owner's module is in the folder they run from, as `python -m` would find it.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
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

    def stopped_by(name: str) -> None:
        # A task abandoned here has no result yet: it is answered again after a restart.
        log.info(
            "datasite.stopped",
            datasite=runner.settings.email,
            signal=name,
            abandoned_task=runner.current_task,
        )

    if not await _until_signal(runner.run, stopped_by):
        log.info("datasite.stopped", datasite=runner.settings.email, reason="the job has ended")


async def _until_signal(work: Callable[[], Awaitable[None]], stopped_by: Callable[[str], None]) -> bool:
    """Run ``work()`` until it returns (False), or until SIGTERM/SIGINT cancels it (True)."""
    signalled: list[str] = []
    async with anyio.create_task_group() as group:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for number in signals:
                    signalled.append(signal.Signals(number).name)
                    stopped_by(signalled[0])
                    group.cancel_scope.cancel()
                    return

        group.start_soon(stop_on_signal)
        await work()
        group.cancel_scope.cancel()
    return bool(signalled)


if __name__ == "__main__":
    sys.exit(pool_main())
