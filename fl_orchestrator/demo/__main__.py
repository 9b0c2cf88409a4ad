"""`python -m fl_orchestrator.demo`: a real federation on this machine, in about a minute.

A thin use of `fl-orchestrator simulate` (simulate/run.py): five datasite
processes train softmax regression on non-IID shares of the digits data set
(fl_orchestrator/demo/digits.py); one is too slow for the round timeout and
one fails in every even round. The daemon aggregates with FedAvg and
evaluates centrally after every round; the demo passes if the final accuracy
on held-out data reaches the target.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fl_orchestrator.cli.report import ReportError, make_report
from fl_orchestrator.config import ConfigError
from fl_orchestrator.simulate.run import SimulateSettings, simulate

TARGET_ACCURACY = 0.90
DATASITES = 5


def _default_config() -> Path:
    return Path(__file__).resolve().parents[2] / "config" / "demo.toml"


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit 0 only if the final accuracy reaches the target."""
    parser = argparse.ArgumentParser(prog="python -m fl_orchestrator.demo")
    parser.add_argument("--config", type=Path, default=_default_config())
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fl-orchestrator-demo-"))
    settings = SimulateSettings(
        config=args.config,
        datasites=DATASITES,
        train="fl_orchestrator.demo.digits:train",
        slow=1,
        flaky=1,
        workdir=workdir,
    )
    print("fl-orchestrator demo: `fl-orchestrator simulate` of config/demo.toml, FedAvg on digits")
    try:
        result = simulate(settings)
    except (OSError, ConfigError) as exc:
        print(f"demo: cannot prepare {args.config}: {exc}", file=sys.stderr)
        return 78
    accuracy = _final_accuracy(result.state_dir / "metrics.jsonl")
    if result.code != 0 or accuracy is None:
        print(f"demo failed: the daemon exited with {result.code}; logs in {workdir / 'logs'}")
        return 1
    print(f"final accuracy on held-out data: {accuracy:.3f} (target {TARGET_ACCURACY:.2f})")
    tool = Path(sys.executable).with_name("fl-orchestrator")
    print(f"export it:  {tool} export --config {workdir / 'job.toml'} --out model.npz")
    print(f"status:     {tool} status --config {workdir / 'job.toml'}")
    try:
        # The demo's own work folder: its report is remade on each run.
        report = make_report(
            result.state_dir, workdir / "report.png", job=result.job, num_rounds=result.num_rounds, force=True
        )
        print(f"report: {report}")
    except ReportError as exc:
        print(f"report: skipped ({exc})")
    return 0 if accuracy >= TARGET_ACCURACY else 1


def _final_accuracy(metrics: Path) -> float | None:
    """The central accuracy after the last completed round."""
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        value = json.loads(line).get("evaluate_metrics", {}).get("accuracy")
        if isinstance(value, int | float):
            return float(value)
    return None


if __name__ == "__main__":
    sys.exit(main())
