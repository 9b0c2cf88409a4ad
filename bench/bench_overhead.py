"""Benchmark 5: round overhead, from the last needed result landing to every next-round task written.

A FedAvg job with N datasites and no-op training (each result is the global
model it was sent), run for ``overhead_transitions`` + 1 rounds. In each
measured round the simulator writes N - 1 results, waits until the daemon has
accepted them, flushes the disk and waits a moment, then renames the last
result into place. The overhead is the ``timestamp`` of the daemon's
``round.dispatched`` line for the next round (logged once every task file is
written) minus the instant of that rename; the daemon's own lines split it into
detecting and accepting the last result, aggregating (mean, model file,
metrics, checkpoint, and from round 3 on removing the links kept for the round
that dropped out of the checkpoints kept) and dispatching (round log, broadcast
model, N tasks). The daemon is then stopped with SIGTERM, an ordinary clean exit.

Two figures per N, each the best of its transitions: the first rounds (1 -> 2,
2 -> 3), which prune nothing, and the steady state (3 -> 4 and later), which
every later round of a long job pays. The verdict is on the steady state.

The model starts at zeros and the results are sparse files (simulator.py): at
N = 10,000 (``--large``) a round of dense results would be 40 GB. Every N runs
the same way, so the per-datasite cost compares across N.

Bytes written per round (first transition): every file under the aggregator's
job folder and the state folder, compared between round 1's and round 2's
dispatch (new files whole, appended logs by their growth), and the daemon's
``wchar`` counter over the same span (every write(2), its log lines included).

Baseline, in the same run, measured right after each transition while the
daemon waits for the next round's results: the plain-syscall floor of the same
writes: three model-sized files with fsync (broadcast model, state model,
checkpoint) and N task-sized files written to a temp name and renamed, without
the daemon. (Since the broadcast became a link and the checkpoint names the
model, the daemon writes one model file, not three: the floor is the same as in
the figures of 2026-11-29.)

Per-datasite cost: the slope of the overhead (and of the floor) between
consecutive sizes, in ms per datasite, and a least-squares line through every
size. Equal slopes between 100 -> 1,000 and 1,000 -> 10,000 mean O(N).
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from harness import Outcome, Row, Sizes, fmt_seconds, log_time, verdict
from simulator import (
    DaemonProcess,
    Datasites,
    Event,
    JobSpec,
    bytes_written,
    site_emails,
    snapshot,
    write_frames,
    write_job,
)

from fl_orchestrator.storage.atomic import fsync_dir, temp_name_for

# The targets: seconds per round at each N, and at N = 1,000 also a multiple of the floor.
TARGETS_SECONDS = {100: 0.5, 1000: 3.0, 10_000: 2.0}
TARGETS_FLOOR_RATIO = {1000: 1.5}
# The daemon's default keep_checkpoints (3): from round 3 on, each aggregate prunes a round's kept links.
FIRST_STEADY_ROUND = 3


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


def io_floor(folder: Path, model_bytes: int, task_bytes: int, tasks: int) -> dict[str, float]:
    """Seconds for the plain-syscall version of a round transition's writes (and its two parts)."""
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
    models_done = time.perf_counter()
    task_dir = folder / "tasks"
    task_dir.mkdir()
    for index in range(tasks):
        final = task_dir / f"{index:032x}.task"
        temp = temp_name_for(final)
        write_frames(temp, [small])
        os.replace(temp, final)
    done = time.perf_counter()
    shutil.rmtree(folder)
    return {
        "seconds": done - started,
        "models_seconds": models_done - started,
        "tasks_seconds": done - models_done,
    }


def one_transition(
    daemon: DaemonProcess, sim: Datasites, dispatched: Event, timeout: float
) -> tuple[dict[str, Any], Event]:
    """Answer the round ``dispatched`` opened, the last result alone; time it until the next dispatch."""
    rnd = int(dispatched["round"])
    tasks = sim.tasks(rnd, dispatched["selected"])
    zeros = sim.zero_model or sim.answer_with_holes(sim.read_model(tasks[0].model))
    for index, task in enumerate(tasks[:-1]):
        sim.write_result(task, sim.result_frames(task, zeros, 100 + index))
    for _ in tasks[:-1]:
        event = daemon.wait_for(
            lambda e: (
                e.get("event") == "file.rejected"
                or (e.get("event") == "result.accepted" and e.get("round") == rnd)
            ),
            timeout,
            f"round {rnd}'s results accepted",
        )
        if event["event"] == "file.rejected":  # would otherwise wait out the timeout
            raise RuntimeError(f"the daemon refused a result: {event.get('reason')}: {event.get('detail')}")
    last = sim.stage_result(tasks[-1], sim.result_frames(tasks[-1], zeros, 100))
    os.sync()
    time.sleep(0.5)
    landed = sim.land(last)
    following = daemon.wait_event("round.dispatched", timeout, round=rnd + 1)
    accepted = daemon.find("result.accepted", round=rnd, datasite=tasks[-1].datasite)
    completed = daemon.find("round.completed", round=rnd)
    t_accept, t_done, t_dispatch = log_time(accepted[0]), log_time(completed[0]), log_time(following)
    return {
        "round": rnd,
        "overhead_seconds": t_dispatch - landed,
        "detect_and_accept_seconds": t_accept - landed,
        "accept_to_completed_seconds": t_done - t_accept,
        "completed_to_dispatched_seconds": t_dispatch - t_done,
        "daemon_aggregate_seconds": completed[0].get("aggregate_seconds"),
        "daemon_dispatch_seconds": following.get("dispatch_seconds"),
    }, following


def one_job(sizes: Sizes, folder: Path, sites: int) -> dict[str, Any]:
    """Run the job and measure each round's transition to the next, each beside its I/O floor."""
    transitions = sizes.overhead_transitions
    spec = JobSpec(sites=sites, params=sizes.overhead_params, num_rounds=transitions + 1, init="zeros")
    job = write_job(folder, spec)
    sim = Datasites(folder / "syftbox", site_emails(sites))
    sim.prepare()
    timeout = sizes.daemon_timeout_seconds
    watched = [sim.layout.aggregator_dir, folder / "state"]
    measured: list[dict[str, Any]] = []
    with DaemonProcess(job, folder / "daemon.log") as daemon:
        first = daemon.wait_event("round.dispatched", timeout, round=1)
        before, io_before = snapshot(watched), daemon.io()
        dispatched = first
        for _ in range(transitions):
            transition, dispatched = one_transition(daemon, sim, dispatched, timeout)
            if not measured:
                io_after, after = daemon.io(), snapshot(watched)
            model_bytes = int(dispatched.get("model_bytes", 4 * sizes.overhead_params))
            selected = max(1, len(dispatched.get("selected", [])))
            task_bytes = max(1, int(dispatched.get("task_bytes", 0)) // selected)
            # The daemon now waits for the next round's results: the floor runs beside an idle daemon.
            floor = io_floor(folder / "floor", model_bytes, task_bytes, sites)
            transition["io_floor_seconds"] = floor["seconds"]
            transition["io_floor_parts_seconds"] = floor
            measured.append(transition)
        daemon.terminate()
        exit_ = daemon.finish(timeout)
        started = daemon.find("job.started")
        waiting_lines = len(daemon.find("round.waiting_for_nodes"))
    if exit_.code != 0:
        raise RuntimeError(f"the daemon exited {exit_.code}; see {folder}/daemon.log")
    written = bytes_written(before, after, categorise)
    floor = min(t["io_floor_seconds"] for t in measured)
    phases: dict[str, Any] = {}
    for phase, these in (
        ("first", [t for t in measured if t["round"] < FIRST_STEADY_ROUND]),
        ("steady", [t for t in measured if t["round"] >= FIRST_STEADY_ROUND]),
    ):
        if these:
            best = min(these, key=lambda t: t["overhead_seconds"])
            phases[phase] = {
                **best,
                "rounds": [t["round"] for t in these],
                "overhead_seconds_worst": max(t["overhead_seconds"] for t in these),
                "per_datasite_ms": best["overhead_seconds"] / sites * 1e3,
                "floor_ratio": best["overhead_seconds"] / floor,
            }
    return {
        "sites": sites,
        **phases,
        "io_floor_seconds": floor,
        "io_floor_seconds_median": statistics.median(t["io_floor_seconds"] for t in measured),
        "transitions": measured,
        "bytes_written_by_file_kind": written,
        "bytes_written_total": sum(written.values()),
        "wchar_bytes": io_after.get("wchar", 0) - io_before.get("wchar", 0),
        "model_bytes": model_bytes,
        "task_bytes_each": task_bytes,
        # Not part of the round overhead: how long the daemon took from start to its first dispatch
        # with every heartbeat already present, and how much it logged meanwhile.
        "startup_to_first_dispatch_seconds": log_time(first) - log_time(started[0]),
        "waiting_for_nodes_log_lines": waiting_lines,
        "daemon_log_bytes": (folder / "daemon.log").stat().st_size,
    }


def per_datasite(jobs: list[dict[str, Any]], phase: str) -> dict[str, Any]:
    """Slopes of one phase's overhead (and of the floor) between consecutive N, and a least-squares line."""
    ordered = sorted((j for j in jobs if phase in j), key=lambda j: j["sites"])
    slopes = []
    for low, high in itertools.pairwise(ordered):
        span = high["sites"] - low["sites"]
        slopes.append(
            {
                "from": low["sites"],
                "to": high["sites"],
                "ms_per_datasite": (high[phase]["overhead_seconds"] - low[phase]["overhead_seconds"])
                / span
                * 1e3,
                "floor_ms_per_datasite": (high["io_floor_seconds"] - low["io_floor_seconds"]) / span * 1e3,
            }
        )
    fit: dict[str, float] = {}
    if len(ordered) >= 2:
        xs = [float(j["sites"]) for j in ordered]
        line = statistics.linear_regression(xs, [j[phase]["overhead_seconds"] for j in ordered])
        floor_line = statistics.linear_regression(xs, [j["io_floor_seconds"] for j in ordered])
        fit = {
            "fixed_seconds": line.intercept,
            "ms_per_datasite": line.slope * 1e3,
            "floor_fixed_seconds": floor_line.intercept,
            "floor_ms_per_datasite": floor_line.slope * 1e3,
        }
    return {"slopes": slopes, "fit": fit}


PHASE_NAMES = {"first": "rounds 1-2", "steady": "steady state, round 3+"}


def phase_rows(job: dict[str, Any], phase: str, transitions: int, verdicts: bool) -> list[Row]:
    """The rows of one N's phase: overhead vs floor (with the targets when ``verdicts``), its parts."""
    n, figures = job["sites"], job[phase]
    label = f"{PHASE_NAMES[phase]}, best of {len(figures['rounds'])}"
    target = TARGETS_SECONDS.get(n) if verdicts else None
    rows = [
        Row(
            "5 overhead",
            f"last result -> next round dispatched, N={n} ({label})",
            fmt_seconds(figures["overhead_seconds"]),
            f"io floor {fmt_seconds(job['io_floor_seconds'])}",
            f"{figures['floor_ratio']:.1f}",
            f"<= {target:.1f} s" if target is not None else "",
            verdict(None if target is None else figures["overhead_seconds"] <= target),
        )
    ]
    floor_target = TARGETS_FLOOR_RATIO.get(n) if verdicts else None
    if floor_target is not None:
        rows.append(
            Row(
                "5 overhead",
                f"  N={n}: overhead / io floor",
                f"{figures['floor_ratio']:.2f}x",
                "",
                "",
                f"<= {floor_target:.1f}x",
                verdict(figures["floor_ratio"] <= floor_target),
            )
        )
    parts = " / ".join(
        fmt_seconds(figures[k])
        for k in (
            "detect_and_accept_seconds",
            "accept_to_completed_seconds",
            "completed_to_dispatched_seconds",
        )
    )
    rows.append(
        Row(
            "5 overhead",
            f"  N={n}: accept / aggregate / dispatch; worst of {len(figures['rounds'])}; per datasite",
            f"{parts}; {fmt_seconds(figures['overhead_seconds_worst'])}; {figures['per_datasite_ms']:.3f} ms",
        )
    )
    return rows


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
    phases = [phase for phase in PHASE_NAMES if any(phase in job for job in jobs)]
    # The verdict is on the steady state when there is one (what every later round pays).
    judged = phases[-1]
    scaling = {phase: per_datasite(jobs, phase) for phase in phases}
    data: dict[str, Any] = {
        "params": sizes.overhead_params,
        "transitions_per_size": sizes.overhead_transitions,
        "judged_phase": judged,
        "jobs": jobs,
        "per_datasite": scaling,
    }
    for job in jobs:
        n = job["sites"]
        target, floor_target = TARGETS_SECONDS.get(n), TARGETS_FLOOR_RATIO.get(n)
        data[f"pass_{n}"] = None if target is None else job[judged]["overhead_seconds"] <= target
        if floor_target is not None:
            data[f"pass_{n}_floor_ratio"] = job[judged]["floor_ratio"] <= floor_target
        for phase in phases:
            rows += phase_rows(job, phase, sizes.overhead_transitions, verdicts=phase == judged)
        floor = job["transitions"][0]["io_floor_parts_seconds"]
        rows.append(
            Row(
                "5 overhead",
                f"  N={n}: io floor: models / tasks (first transition); median of all",
                f"{fmt_seconds(floor['models_seconds'])} / {fmt_seconds(floor['tasks_seconds'])}; "
                f"{fmt_seconds(job['io_floor_seconds_median'])}",
            )
        )
        rows.append(
            Row(
                "5 overhead",
                f"  N={n}: start -> first dispatch (not a target)",
                fmt_seconds(job["startup_to_first_dispatch_seconds"]),
                f"{job['waiting_for_nodes_log_lines']} waiting lines",
            )
        )
        rows.append(
            Row(
                "5 overhead",
                f"  N={n}: bytes written per round (files; wchar)",
                f"{job['bytes_written_total'] / 1e6:.1f} MB; {job['wchar_bytes'] / 1e6:.1f} MB",
                f"model {job['model_bytes'] / 1e6:.1f} MB",
                f"{job['bytes_written_total'] / job['model_bytes']:.2f}x model",
            )
        )
    for phase in phases:
        for slope in scaling[phase]["slopes"]:
            floor_slope = slope["floor_ms_per_datasite"]
            rows.append(
                Row(
                    "5 overhead",
                    f"per-datasite cost ({PHASE_NAMES[phase]}), slope N={slope['from']} -> {slope['to']}",
                    f"{slope['ms_per_datasite']:.3f} ms/datasite",
                    f"io floor {floor_slope:.3f} ms/datasite",
                    f"{slope['ms_per_datasite'] / floor_slope:.1f}" if floor_slope > 0 else "",
                )
            )
        fit = scaling[phase]["fit"]
        if fit:
            rows.append(
                Row(
                    "5 overhead",
                    f"least squares ({PHASE_NAMES[phase]}), N={', '.join(str(j['sites']) for j in jobs)}",
                    f"{fmt_seconds(fit['fixed_seconds'])} + {fit['ms_per_datasite']:.3f} ms x N",
                    f"io floor {fmt_seconds(fit['floor_fixed_seconds'])} + "
                    f"{fit['floor_ms_per_datasite']:.3f} ms x N",
                )
            )
    return Outcome("ok", data, rows)
