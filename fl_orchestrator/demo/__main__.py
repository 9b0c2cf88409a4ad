"""`python -m fl_orchestrator.demo`: a real federation on this machine, in about a minute.

Five datasite processes train on non-IID shares of the digits data set; one is
too slow for the round timeout and one fails every third round. The daemon
aggregates with FedAvg and evaluates centrally after every round.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from fl_orchestrator.config import ConfigError
from fl_orchestrator.demo import digits
from fl_orchestrator.simulate.federation import DatasiteSpec, LocalFederation, prepare_workdir

TARGET_ACCURACY = 0.90
BEHAVIOURS = {3: "slow", 4: "flaky"}


def _default_config() -> Path:
    return Path(__file__).resolve().parents[2] / "config" / "demo.toml"


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit 0 only if the final accuracy reaches the target."""
    parser = argparse.ArgumentParser(prog="python -m fl_orchestrator.demo")
    parser.add_argument("--config", type=Path, default=_default_config())
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fl-orchestrator-demo-"))
    try:
        job_file = prepare_workdir(args.config, workdir)
        federation = LocalFederation(job_file, workdir / "logs")
        config = federation.config
    except (OSError, ConfigError) as exc:
        print(f"demo: cannot prepare {args.config}: {exc}", file=sys.stderr)
        return 78
    emails = config.syftbox.datasites
    timeout = config.job.round_timeout_seconds
    print(f"fl-orchestrator demo: {len(emails)} datasites, {config.job.num_rounds} rounds, FedAvg")
    print(f"  work folder: {workdir}")
    specs = []
    for index, email in enumerate(emails):
        behaviour = BEHAVIOURS.get(index, "normal")
        env = {
            digits.ENV_PARTITION: str(index),
            digits.ENV_NUM_PARTITIONS: str(len(emails)),
            digits.ENV_BEHAVIOUR: behaviour,
            digits.ENV_SLOW_SECONDS: str(timeout * 1.6),
        }
        specs.append(DatasiteSpec(email, "fl_orchestrator.demo.digits:train", env))
        note = {"slow": "  (slower than the round timeout)", "flaky": "  (fails every third round)"}
        print(f"  datasite {email}{note.get(behaviour, '')}")
    print()
    header = ("round", "sent", "ok", "fail", "late", "accuracy", "collect s")
    print("{:>5}  {:>4} {:>3} {:>4} {:>4}  {:>8}  {:>9}  notes".format(*header))
    final_accuracy: float | None = None
    final_model = ""
    exit_code = 1
    try:
        federation.start_datasites(specs)
        limit = config.job.num_rounds * (timeout + 10) + config.job.available_timeout_seconds + 60
        for event in federation.run_daemon(timeout_seconds=limit):
            name = event.get("event")
            if name == "evaluate.done" and event.get("round") == 0:
                initial = event["metrics"]["accuracy"]
                print(f"{0:>5}  {'':>17}  {initial:>8.3f}  {'':>9}  initial model")
            elif name == "round.completed":
                _print_round(event)
                final_accuracy = event.get("evaluate_metrics", {}).get("accuracy", final_accuracy)
            elif name == "round.attempt_failed":
                print(f"{event['round']:>5}  attempt {event['attempt']} failed: {event['reason']}")
            elif name in ("job.failed", "daemon.crashed"):
                print(f"job failed: {event.get('reason', event)}")
            elif name == "job.finished":
                final_model = event.get("final_model", "")
            elif name == "raw":
                print(f"  daemon: {event['line']}")
            elif name == "daemon.exit":
                exit_code = int(event["code"])
    finally:
        federation.stop()
    print()
    if exit_code != 0 or final_accuracy is None:
        print(f"demo failed: the daemon exited with {exit_code}; logs in {workdir / 'logs'}")
        return 1
    print(f"final accuracy on held-out data: {final_accuracy:.3f} (target {TARGET_ACCURACY:.2f})")
    print(f"final model: {final_model}")
    print(f"logs: {workdir / 'logs'}   state: {config.state.state_dir}")
    tool = Path(sys.executable).with_name("fl-orchestrator")
    print(f"export it:  {tool} export --config {job_file} --out model.npz")
    print(f"status:     {tool} status --config {job_file}")
    _write_report(config.state.state_dir, workdir / "report.png", config.job.name, config.job.num_rounds)
    return 0 if final_accuracy >= TARGET_ACCURACY else 1


def _write_report(state_dir: Path, out: Path, job: str, num_rounds: int) -> None:
    """Training curves and participation, when the [plot] extra is installed."""
    from fl_orchestrator.cli.report import ReportError, make_report

    try:
        make_report(state_dir, out, job=job, num_rounds=num_rounds)
    except ReportError as exc:
        print(f"report: skipped ({exc})")
        return
    print(f"report: {out}")


def _print_round(event: dict[str, Any]) -> None:
    accuracy = event.get("evaluate_metrics", {}).get("accuracy", float("nan"))
    stragglers = ", ".join(event.get("stragglers", []))
    failures = ", ".join(f"{k} ({v})" for k, v in event.get("failures", {}).items())
    notes = "; ".join(
        x
        for x in (f"timed out: {stragglers}" if stragglers else "", f"failed: {failures}" if failures else "")
        if x
    )
    print(
        f"{event['round']:>5}  {event['sent']:>4} {event['succeeded']:>3} {event['failed']:>4}"
        f" {event['timed_out']:>4}  {accuracy:>8.3f}  {event['collect_seconds']:>9.3f}  {notes}"
    )


if __name__ == "__main__":
    sys.exit(main())
