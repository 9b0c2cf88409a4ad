"""Benchmark 4: detection latency, from a result's rename into place to the daemon's ``result.accepted``.

A one-round job with many datasites and a tiny model. Once the tasks are out,
the simulator stages every result under its hidden temp name, flushes the disk
and waits a moment (at rest), then renames one result into place every
``pace`` seconds. Latency = the ``timestamp`` of the daemon's result.accepted
line for that datasite minus time.time() taken just before the rename (same
machine, same clock).

Baseline, in the same run, on the same folder and for the same renames: a
bare watchfiles ``awatch`` (awatch_probe.py, with the daemon's debounce, step
and filter) running beside the daemon. Both see each rename under the same
machine load, so "daemon minus awatch" per rename is the daemon's own cost:
reading, round-log append, machine, fold and logging.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import simulator
from harness import Outcome, Row, Sizes, fmt_seconds, log_time, percentile, verdict
from simulator import JOB, DaemonProcess, Datasites, JobSpec, Staged, site_emails, write_frames, write_job

TARGET_P99_SECONDS = 0.050
DEBOUNCE_MS = 5


def paced(staged: list[Staged], pace_seconds: float) -> dict[str, float]:
    """Rename each staged file into place, one every pace_seconds; return {final path: rename time}."""
    landed: dict[str, float] = {}
    start = time.perf_counter() + 0.05
    for index, item in enumerate(staged):
        wait = start + index * pace_seconds - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        landed[os.path.realpath(item.final)] = Datasites.land(item)
    return landed


def summary(latencies: list[float]) -> dict[str, float]:
    """p50, p90, p99, max and mean of latencies in seconds."""
    return {
        "count": len(latencies),
        "p50": percentile(latencies, 50),
        "p90": percentile(latencies, 90),
        "p99": percentile(latencies, 99),
        "max": max(latencies),
        "mean": sum(latencies) / len(latencies),
    }


class Probe:
    """The bare awatch baseline as a subprocess, and the batches it reported."""

    def __init__(self, folder: Path) -> None:
        step = max(1, min(DEBOUNCE_MS, math.ceil(DEBOUNCE_MS / 4)))  # as the daemon's watcher
        marker = os.sep + os.path.join("app_data", "fl_orchestrator", JOB) + os.sep
        script = Path(__file__).with_name("awatch_probe.py")
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(folder), marker, str(DEBOUNCE_MS), str(step)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.first_seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            batch = json.loads(raw)
            with self._lock:
                for path in batch["paths"]:
                    self.first_seen.setdefault(os.path.realpath(path), batch["t"])

    def seen(self, path: Path) -> bool:
        """Whether the probe has reported this path."""
        with self._lock:
            return os.path.realpath(path) in self.first_seen

    def wait_ready(self, folder: Path, suffix: str, timeout_seconds: float = 15.0) -> None:
        """Write sentinel files until the probe reports one: its watches are then in place."""
        deadline = time.monotonic() + timeout_seconds
        index = 0
        while time.monotonic() < deadline:
            sentinel = folder / f"sentinel{index}{suffix}"
            write_frames(sentinel, [b"x"])
            for _ in range(20):
                if self.seen(sentinel):
                    return
                time.sleep(0.01)
            index += 1
        raise RuntimeError("the awatch probe never reported its sentinel file")

    def wait_seen(self, paths: dict[str, float], timeout_seconds: float) -> None:
        """Wait until the probe has reported every path (or the timeout passed)."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            with self._lock:
                if all(p in self.first_seen for p in paths):
                    return
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM the probe (by pid) and reap it."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


def run(sizes: Sizes, folder: Path, shared: dict[str, Any]) -> Outcome:
    """Benchmark 4."""
    sites = sizes.latency_sites
    spec = JobSpec(sites=sites, params=sizes.latency_params, debounce_milliseconds=DEBOUNCE_MS)
    job = write_job(folder, spec)
    sim = Datasites(folder / "syftbox", site_emails(sites))
    sim.prepare()
    timeout = sizes.daemon_timeout_seconds
    with DaemonProcess(job, folder / "daemon.log") as daemon:
        dispatched = daemon.wait_event("round.dispatched", timeout, round=1)
        tasks = sim.tasks(1, dispatched["selected"])
        model = sim.read_model(tasks[0].model)
        staged = [sim.stage_result(t, sim.result_frames(t, model, 100)) for t in tasks]
        probe = Probe(sim.layout.datasites_dir)
        try:
            # A file the probe reports and the daemon ignores (not a result, not a heartbeat).
            probe.wait_ready(sim.layout.app_dir(sim.sites[0]), suffix=".ready")
            os.sync()
            time.sleep(0.5)
            load = os.getloadavg()[0]
            landed = paced(staged, sizes.latency_pace_seconds)
            exit_ = daemon.finish(timeout)
            probe.wait_seen(landed, timeout_seconds=10.0)
        finally:
            probe.stop()
        events = daemon.events
    if exit_.code != 0:
        raise RuntimeError(f"the daemon exited {exit_.code}; see {folder}/daemon.log")
    accepted = {
        os.path.realpath(e["path"]): log_time(e) for e in events if e.get("event") == "result.accepted"
    }
    missing = [p for p in landed if p not in accepted or p not in probe.first_seen]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(landed)} renames were not seen by the daemon or the probe"
        )
    order = sorted(landed, key=landed.__getitem__)
    daemon_lat = [accepted[p] - landed[p] for p in order]
    probe_lat = [probe.first_seen[p] - landed[p] for p in order]
    daemon_figures, base = summary(daemon_lat), summary(probe_lat)
    extra = summary([d - b for d, b in zip(daemon_lat, probe_lat, strict=True)])
    passed = daemon_figures["p99"] <= TARGET_P99_SECONDS
    start = landed[order[0]]
    end = max(accepted.values())
    daemon_started = next((log_time(e) for e in events if e.get("event") == "job.started"), start)
    pauses = [e for e in events if e.get("event") == "gc.pause" and start <= e["started"] <= end]
    worst = sorted(range(len(order)), key=lambda i: -daemon_lat[i])[:10]
    data: dict[str, Any] = {
        "results": sites,
        "pace_seconds": sizes.latency_pace_seconds,
        "debounce_milliseconds": DEBOUNCE_MS,
        "load_average_1m_at_start": load,
        "daemon": daemon_figures,
        "baseline_awatch": base,
        "daemon_minus_awatch": extra,
        "p99_ratio": daemon_figures["p99"] / base["p99"],
        "p50_ratio": daemon_figures["p50"] / base["p50"],
        "target_p99_seconds": TARGET_P99_SECONDS,
        "pass": passed,
        "worst": [
            {
                "at_seconds": round(landed[order[i]] - start, 3),
                # Rescans run at start and then every rescan_interval_seconds (15 s) after the previous.
                "since_daemon_start_seconds": round(landed[order[i]] - daemon_started, 3),
                "daemon_ms": round(daemon_lat[i] * 1e3, 2),
                "awatch_ms": round(probe_lat[i] * 1e3, 2),
            }
            for i in sorted(worst)
        ],
        "gc_pauses_during_renames": (
            None
            if simulator.TRACE_GC is False
            else [
                {"at_seconds": round(e["started"] - start, 3), "ms": e["ms"], "gen": e["generation"]}
                for e in pauses
            ]
        ),
        "daemon_ms_in_rename_order": [round(v * 1e3, 2) for v in daemon_lat],
        "awatch_ms_in_rename_order": [round(v * 1e3, 2) for v in probe_lat],
    }
    rows = []
    for q in ("p50", "p99", "max"):
        rows.append(
            Row(
                "4 latency",
                f"rename -> result.accepted {q}",
                fmt_seconds(daemon_figures[q]),
                f"awatch {fmt_seconds(base[q])}",
                f"{daemon_figures[q] / base[q]:.1f}",
                f"<= {fmt_seconds(TARGET_P99_SECONDS)}" if q == "p99" else "",
                verdict(passed) if q == "p99" else "",
            )
        )
    if simulator.TRACE_GC:
        rows.append(
            Row(
                "4 latency",
                "  GC pauses > 1 ms during the renames (--trace-gc)",
                f"{len(pauses)}, longest {max((e['ms'] for e in pauses), default=0):.1f} ms",
            )
        )
    rows.append(
        Row(
            "4 latency",
            "  daemon minus awatch, same rename: p50 / p99",
            f"{fmt_seconds(extra['p50'])} / {fmt_seconds(extra['p99'])}",
        )
    )
    return Outcome("ok", data, rows)
