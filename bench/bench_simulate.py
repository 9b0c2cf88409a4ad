"""Benchmark 8: `fl-orchestrator simulate`, a whole 3-round job against N simulated datasites.

The installed command, as a data scientist runs it: the real daemon, N
datasites running a trivial train function (``tests/support/sim_code.py``:
one step per datasite, weighted by its partition), a 68-parameter model,
``min_available_nodes = N`` so every round waits for all N. The figure is the
wall time of the whole command, start to report, for each N with the
in-process runners (``--runners threads``). Baseline, in the same run: the
same job with one process per datasite (``--runners processes``) at
``simulate_process_sites``. Targets (issue #18): N = 100 under 60 s, N = 1,000
under 5 minutes, on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w
from harness import Outcome, Row, Sizes, fmt_seconds, verdict

REPO = Path(__file__).resolve().parent.parent
TOOL = Path(sys.executable).with_name("fl-orchestrator")
TARGETS = {100: 60.0, 1000: 300.0}


def write_job(
    folder: Path,
    count: int,
    *,
    name: str = "simbench",
    arrays: dict[str, Any] | None = None,
    timeout_seconds: float = 300.0,
) -> Path:
    """A 3-round job over ``count`` datasites that waits for all of them every round."""
    table: dict[str, Any] = {
        "job": {
            "name": name,
            "num_rounds": 3,
            "round_timeout_seconds": timeout_seconds,
            "min_train_nodes": count,
            "min_available_nodes": count,
            "available_timeout_seconds": timeout_seconds,
            "max_round_retries": 0,
        },
        "syftbox": {
            "root": "syftbox",
            "aggregator_email": "agg@bench.example.org",
            "datasites": [f"ds{i}@bench.example.org" for i in range(count)],
        },
        "model": {
            "source": "random",
            "seed": 1,
            "arrays": arrays
            or {"w": {"shape": [16, 4], "init": "normal"}, "b": {"shape": [4], "init": "zeros"}},
        },
        "state": {"state_dir": "state"},
        "logging": {"format": "json"},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.toml"
    path.write_text(tomli_w.dumps(table), encoding="utf-8")
    return path


def _simulate(folder: Path, count: int, runners: str, timeout: float) -> tuple[float, int, list[str]]:
    job = write_job(folder / "job", count)
    command = [
        str(TOOL),
        "simulate",
        "--config",
        str(job),
        "--datasites",
        str(count),
        "--train",
        "support.sim_code:train",
        "--partition",
        "support.sim_code:partition",
        "--runners",
        runners,
        "--workdir",
        str(folder / "sim"),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests"))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    wall = time.perf_counter() - started
    rows = [line for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    return wall, done.returncode, rows


def run(sizes: Sizes, work: Path, shared: dict[str, Any]) -> Outcome:
    """Each N in process, then the one-process-each baseline."""
    timeout = sizes.daemon_timeout_seconds
    base_n = sizes.simulate_process_sites
    base_wall, base_code, _ = _simulate(work / f"processes-{base_n}", base_n, "processes", timeout)
    data: dict[str, Any] = {
        "processes": {"n": base_n, "wall_seconds": round(base_wall, 2), "code": base_code}
    }
    rows = [Row("simulate", f"N = {base_n}, one process each (baseline)", fmt_seconds(base_wall))]
    failed = base_code != 0
    for count in sizes.simulate_sites:
        wall, code, table = _simulate(work / f"threads-{count}", count, "threads", timeout)
        failed |= code != 0
        data[f"threads_{count}"] = {"wall_seconds": round(wall, 2), "code": code, "rounds": table}
        target = TARGETS.get(count)
        ratio = f"{wall / base_wall:.2f} x" if count == base_n else ""
        rows.append(
            Row(
                "simulate",
                f"N = {count}, in-process runners, 3 rounds" + ("" if code == 0 else f" (exit {code})"),
                fmt_seconds(wall),
                fmt_seconds(base_wall) if count == base_n else "",
                ratio,
                f"< {target:.0f} s" if target else "",
                verdict(wall < target and code == 0) if target else verdict(None),
            )
        )
    if failed:
        return Outcome("error", data, rows, "a simulation did not exit 0")
    return Outcome("ok", data, rows)
