"""Benchmark 5: round overhead, from the last needed result landing to every next-round task written.

A two-round FedAvg job with N datasites and no-op training (each result is the
global model it was sent). In round 1 the simulator writes N - 1 results, waits
until the daemon has accepted them, flushes the disk and waits a moment, then
renames the last result into place. The overhead is the ``timestamp`` of the
daemon's ``round.dispatched`` line for round 2 (logged once every task file is
written) minus the instant of that rename; the daemon's own lines split it into
detecting and accepting the last result, aggregating (mean, model file,
metrics, checkpoint) and dispatching (round log, broadcast model, N tasks).
The daemon is then stopped with SIGTERM, which is an ordinary clean exit.

Bytes written per round: every file under the aggregator's job folder and the
state folder, compared between round 1's and round 2's dispatch (new files
whole, appended logs by their growth), and the daemon's ``wchar`` counter over
the same span (every write(2), its log lines included).

Baseline, in the same run: the plain-syscall floor of the same writes: three
model-sized files with fsync (broadcast model, state model, checkpoint) and N
task-sized files written to a temp name and renamed, without the daemon.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from harness import Outcome, Row, Sizes, fmt_seconds, log_time, verdict
from simulator import (
    DaemonProcess,
    Datasites,
    JobSpec,
    bytes_written,
    site_emails,
    snapshot,
    write_frames,
    write_job,
)

from fl_orchestrator.storage.atomic import fsync_dir, temp_name_for

TARGETS_SECONDS = {100: 0.5, 1000: 3.0}


def categorise(path: str) -> str:
    """Which kind of aggregator file a path is."""
    parts = Path(path).parts
    if "tasks" in parts:
        return "tasks"
    if "checkpoints" in parts:
        return "checkpoints"
    if "rounds" in parts:
        return "round_log"
    if "models" in parts:
        return "broadcast_model" if "app_data" in parts else "state_model"
    return Path(path).name


def io_floor(folder: Path, model_bytes: int, task_bytes: int, tasks: int) -> float:
    """Seconds for the plain-syscall version of a round transition's writes."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = memoryview(bytearray(os.urandom(1024)) * (model_bytes // 1024 + 1))[:model_bytes]
    small = os.urandom(task_bytes)
    started = time.perf_counter()
    for name in ("broadcast", "state", "checkpoint"):
        path = folder / f"{name}.bin"
        write_frames(path, [payload])
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(folder)
    task_dir = folder / "tasks"
    task_dir.mkdir()
    for index in range(tasks):
        final = task_dir / f"{index:032x}.task"
        temp = temp_name_for(final)
        write_frames(temp, [small])
        os.replace(temp, final)
    seconds = time.perf_counter() - started
    shutil.rmtree(folder)
    return seconds


def one_job(sizes: Sizes, folder: Path, sites: int) -> dict[str, Any]:
    """Run the two-round job and measure the round 1 -> round 2 transition."""
    spec = JobSpec(sites=sites, params=sizes.overhead_params, num_rounds=2)
    job = write_job(folder, spec)
    sim = Datasites(folder / "syftbox", site_emails(sites))
    sim.prepare()
    timeout = sizes.daemon_timeout_seconds
    watched = [sim.layout.aggregator_dir, folder / "state"]
    with DaemonProcess(job, folder / "daemon.log") as daemon:
        first = daemon.wait_event("round.dispatched", timeout, round=1)
        before, io_before = snapshot(watched), daemon.io()
        tasks = sim.tasks(1, first["selected"])
        model = sim.read_model(tasks[0].model)
        for index, task in enumerate(tasks[:-1]):
            sim.write_result(task, sim.result_frames(task, model, 100 + index))
        daemon.wait_count("result.accepted", len(tasks) - 1, timeout, round=1)
        last = sim.stage_result(tasks[-1], sim.result_frames(tasks[-1], model, 100))
        os.sync()
        time.sleep(0.5)
        landed = sim.land(last)
        second = daemon.wait_event("round.dispatched", timeout, round=2)
        io_after, after = daemon.io(), snapshot(watched)
        daemon.terminate()
        exit_ = daemon.finish(timeout)
        accepted = daemon.find("result.accepted", round=1, datasite=tasks[-1].datasite)
        completed = daemon.find("round.completed", round=1)
        started = daemon.find("job.started")
        waiting_lines = len(daemon.find("round.waiting_for_nodes"))
    if exit_.code != 0:
        raise RuntimeError(f"the daemon exited {exit_.code}; see {folder}/daemon.log")
    task_bytes = max(1, int(second.get("task_bytes", 0)) // max(1, len(second.get("selected", []))))
    model_bytes = int(second.get("model_bytes", 4 * sizes.overhead_params))
    written = bytes_written(before, after, categorise)
    t_accept, t_done, t_dispatch = log_time(accepted[0]), log_time(completed[0]), log_time(second)
    return {
        "sites": sites,
        "overhead_seconds": t_dispatch - landed,
        "detect_and_accept_seconds": t_accept - landed,
        "accept_to_completed_seconds": t_done - t_accept,
        "completed_to_dispatched_seconds": t_dispatch - t_done,
        "daemon_aggregate_seconds": completed[0].get("aggregate_seconds"),
        "daemon_dispatch_seconds": second.get("dispatch_seconds"),
        "bytes_written_by_file_kind": written,
        "bytes_written_total": sum(written.values()),
        "wchar_bytes": io_after.get("wchar", 0) - io_before.get("wchar", 0),
        "model_bytes": model_bytes,
        "task_bytes_each": task_bytes,
        "io_floor_seconds": io_floor(folder / "floor", model_bytes, task_bytes, sites),
        # Not part of the round overhead: how long the daemon took from start to its first dispatch
        # with every heartbeat already present, and how much it logged meanwhile.
        "startup_to_first_dispatch_seconds": log_time(first) - log_time(started[0]),
        "waiting_for_nodes_log_lines": waiting_lines,
        "daemon_log_bytes": (folder / "daemon.log").stat().st_size,
    }


def run(sizes: Sizes, folder: Path, shared: dict[str, Any]) -> Outcome:
    """Benchmark 5."""
    jobs: list[dict[str, Any]] = []
    for sites in sizes.overhead_sites:
        where = folder / f"n{sites}"
        try:
            jobs.append(one_job(sizes, where, sites))
        finally:
            shutil.rmtree(where, ignore_errors=True)
    rows = []
    data: dict[str, Any] = {"params": sizes.overhead_params, "jobs": jobs}
    for job in jobs:
        target = TARGETS_SECONDS.get(job["sites"])
        passed = None if target is None else job["overhead_seconds"] <= target
        data[f"pass_{job['sites']}"] = passed
        rows.append(
            Row(
                "5 overhead",
                f"last result -> round 2 dispatched, N={job['sites']}",
                fmt_seconds(job["overhead_seconds"]),
                f"io floor {fmt_seconds(job['io_floor_seconds'])}",
                f"{job['overhead_seconds'] / job['io_floor_seconds']:.1f}",
                f"<= {target:.1f} s" if target is not None else "",
                verdict(passed),
            )
        )
        parts = " / ".join(
            fmt_seconds(job[k])
            for k in (
                "detect_and_accept_seconds",
                "accept_to_completed_seconds",
                "completed_to_dispatched_seconds",
            )
        )
        rows.append(Row("5 overhead", f"  N={job['sites']}: accept / aggregate / dispatch", parts))
        rows.append(
            Row(
                "5 overhead",
                f"  N={job['sites']}: start -> first dispatch (not a target)",
                fmt_seconds(job["startup_to_first_dispatch_seconds"]),
                f"{job['waiting_for_nodes_log_lines']} waiting lines",
            )
        )
        rows.append(
            Row(
                "5 overhead",
                f"  N={job['sites']}: bytes written per round (files; wchar)",
                f"{job['bytes_written_total'] / 1e6:.1f} MB; {job['wchar_bytes'] / 1e6:.1f} MB",
                f"model {job['model_bytes'] / 1e6:.1f} MB",
                f"{job['bytes_written_total'] / job['model_bytes']:.2f}x model",
            )
        )
    return Outcome("ok", data, rows)
