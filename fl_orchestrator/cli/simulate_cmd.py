"""`fl-orchestrator simulate`: the whole job on this machine, then its report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fl_orchestrator.cli.report import ReportError, make_report
from fl_orchestrator.config import EX_CONFIG, EX_USAGE, ConfigError
from fl_orchestrator.config.hooks import HookError


def add_simulate_parser(sub: Any) -> None:
    """The ``simulate`` subcommand's flags."""
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
    sim.add_argument(
        "--runners",
        choices=("auto", "processes", "threads"),
        default="auto",
        help="one process per datasite, or in-process runners on a thread pool"
        " (auto: processes up to 20 datasites)",
    )
    sim.add_argument(
        "--tiers",
        type=int,
        default=0,
        metavar="R",
        help="run the job as a root over R region daemons, the datasites split among them (docs/TIERS.md)",
    )
    sim.add_argument("--workdir", type=Path, help="default: a new temporary folder")
    sim.add_argument("--report", type=Path, help="the PNG report (default: WORKDIR/report.png)")
    sim.add_argument("--force", action="store_true", help="overwrite --report if it exists")


def run_simulate(args: argparse.Namespace) -> int:
    """Simulate the job, then write its report; the daemon's exit code."""
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
        runners=args.runners,
        tiers=args.tiers,
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
        # The default lies in the simulation's own work folder; another path is overwritten on --force only.
        force = args.report is None or args.force
        made = make_report(result.state_dir, out, job=result.job, num_rounds=result.num_rounds, force=force)
        print(f"report: {made}")
    except ReportError as exc:
        print(f"report: skipped ({exc})")
    return result.code
