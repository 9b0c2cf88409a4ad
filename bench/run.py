"""Run the fl-orchestrator benchmarks, print a table and write JSON.

    .venv/bin/python bench/run.py                 # full run (several minutes, ~6 GB of temp files)
    .venv/bin/python bench/run.py --smoke         # same code paths at tiny sizes, well under 30 s
    .venv/bin/python bench/run.py --only ingest,encode --repeats 3
    .venv/bin/python bench/run.py --large --only round_overhead   # adds N = 10,000 (many minutes)

Every figure is a ratio against a baseline measured in the same run. Temp
files go to a fresh folder under --workdir (default: the system temp folder)
and are deleted at the end, also on failure. Exit status: 0 when every
benchmark ran (or was skipped with a reason), 1 when one failed to run.
Targets that are not met do not change the exit status: they are reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_encode
import bench_flood
import bench_ingest
import bench_latency
import bench_overhead
import bench_robust
import bench_rss
import bench_simulate
import bench_tiers
import simulator
from harness import BENCH_DIR, FULL, SMOKE, Outcome, Row, Sizes, environment, render_table

Runner = Callable[[Sizes, Path, dict[str, Any]], Outcome]

# In this order: robust reuses the ingest benchmark's files, which are deleted after it.
BENCHMARKS: dict[str, Runner] = {
    "encode": bench_encode.run,
    "ingest": bench_ingest.run,
    "robust": bench_robust.run,
    "daemon_rss": bench_rss.run,
    "detection_latency": bench_latency.run,
    "round_overhead": bench_overhead.run,
    "flood": bench_flood.run,
    "simulate": bench_simulate.run,
    "tiers": bench_tiers.run,
}
_SHARED_FILES_OWNER = "ingest"
_SHARED_FILES_LAST_USER = "robust"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description="fl-orchestrator benchmarks")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code paths run")
    parser.add_argument(
        "--out", type=Path, default=BENCH_DIR / "results" / "latest.json", help="where to write the JSON"
    )
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--repeats", type=int, default=0, help="timed repetitions (default: 5, smoke: 2)")
    parser.add_argument(
        "--large",
        action="store_true",
        help="also the sizes that take long: round_overhead at N = 10,000 datasites",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where temp files go")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (for debugging)")
    parser.add_argument(
        "--trace-gc",
        action="store_true",
        help="diagnosis: run the daemon through bench/daemon_gc_trace.py and report its GC pauses",
    )
    return parser.parse_args(argv)


def run_one(name: str, runner: Runner, sizes: Sizes, work: Path, shared: dict[str, Any]) -> Outcome:
    """Run one benchmark; an exception becomes an 'error' outcome with its traceback."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    try:
        outcome = runner(sizes, folder, shared)
    except Exception as exc:
        outcome = Outcome(
            "error",
            {"traceback": traceback.format_exc()},
            [Row(name, "error", f"{type(exc).__name__}: {exc}"[:100])],
            f"{type(exc).__name__}: {exc}",
        )
    outcome.data["wall_seconds"] = round(time.perf_counter() - started, 2)
    # Other work on the machine shows up here: the figures of a loaded run are noisier.
    outcome.data["load_average_1m"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    print(f"[{name}] {outcome.status} in {outcome.data['wall_seconds']:.1f} s", file=sys.stderr, flush=True)
    return outcome


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; return the exit status."""
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    simulator.TRACE_GC = args.trace_gc
    if args.repeats > 0:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    if args.large:
        sizes = dataclasses.replace(
            sizes,
            overhead_sites=sizes.overhead_sites + sizes.overhead_large_sites,
            tiers_runs=sizes.tiers_runs + sizes.tiers_large_runs,
        )
    selected = [s.strip() for s in args.only.split(",") if s.strip()] or list(BENCHMARKS)
    unknown = [s for s in selected if s not in BENCHMARKS]
    if unknown:
        print(
            f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return 64
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fl-bench-", dir=args.workdir))
    load_at_start = os.getloadavg()[0]
    shared: dict[str, Any] = {}
    outcomes: dict[str, Outcome] = {}
    started = time.perf_counter()
    try:
        for name, runner in BENCHMARKS.items():
            if name not in selected:
                continue
            outcomes[name] = run_one(name, runner, sizes, work, shared)
            # The ingest files (N x model) are only reused by the robust benchmark.
            last_user = name == _SHARED_FILES_LAST_USER or (
                name == _SHARED_FILES_OWNER and _SHARED_FILES_LAST_USER not in selected
            )
            if last_user and not args.keep:
                shutil.rmtree(work / _SHARED_FILES_OWNER, ignore_errors=True)
                shared.pop("result_files", None)
    finally:
        if args.keep:
            print(f"temp files kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report: dict[str, Any] = {
        "mode": sizes.mode,
        "large": args.large,
        "sizes": dataclasses.asdict(sizes),
        "environment": environment(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "load_average_1m": {"start": load_at_start, "end": os.getloadavg()[0]},
    }
    report.update({name: outcome.as_json() for name, outcome in outcomes.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    rows = [row for outcome in outcomes.values() for row in outcome.rows]
    print(render_table(rows))
    env = report["environment"]
    print(
        f"\n{sizes.mode} run, {report['wall_seconds']} s; {env['cpus']} CPUs, numpy {env['numpy']} "
        f"({env['blas']}); thread env: {env['thread_env'] or 'none set'}"
    )
    load = report["load_average_1m"]
    print(f"load average (1 min): {load['start']:.2f} at start, {load['end']:.2f} at end", end="")
    busy = max(load.values()) > 0.5 * (os.cpu_count() or 1)
    print(" - other processes were busy: expect noisier figures" if busy else "")
    for name, outcome in outcomes.items():
        if outcome.status != "ok":
            print(f"{name}: {outcome.status}: {outcome.reason}")
    print(f"JSON: {args.out}")
    return 1 if any(o.status == "error" for o in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
