"""Shared pieces of the benchmarks: sizes, timing, memory readings, environment and the result table.

Every figure is reported beside a baseline measured in the same run, and timed
repetitions of a subject and its baseline are interleaved (A B A B ...), so a
noisy neighbour slows both rather than one of them.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
GB = 1e9
MIB = 1024 * 1024

# Environment variables that change how numpy and its BLAS use threads and CPU features.
_ENV_PREFIXES = ("OPENBLAS", "OMP_", "MKL", "BLIS", "GOTO", "NVPL", "VECLIB", "NUMEXPR", "NPY_")


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark is: the full run or the smoke run."""

    mode: str
    ingest_files: int
    ingest_params: int
    repeats: int
    rss_sites: tuple[int, ...]
    rss_params: int
    rss_repeats: int
    robust_files: int
    robust_params: int
    latency_sites: int
    latency_pace_seconds: float
    latency_params: int
    overhead_sites: tuple[int, ...]
    # Added to overhead_sites by run.py --large (a round of 10,000 datasites takes minutes).
    overhead_large_sites: tuple[int, ...]
    overhead_params: int
    # Benchmark 9: (datasites, regions) of each tiered simulation; run.py --large adds the large ones.
    tiers_runs: tuple[tuple[int, int], ...]
    tiers_large_runs: tuple[tuple[int, int], ...]
    tiers_params: int
    # Round transitions measured per N (each its own round of the same job): 1 -> 2 and 2 -> 3 prune
    # nothing, 3 -> 4 and later are the steady state (bench_overhead.py); the best of each is reported.
    overhead_transitions: int
    encode_params: int
    flood_sites: int
    flood_params: int
    flood_junk_files: int
    flood_repeats: int
    # fl-orchestrator simulate: N for the in-process runners, and N for one process each (the baseline).
    simulate_sites: tuple[int, ...]
    simulate_process_sites: int
    daemon_timeout_seconds: float


FULL = Sizes(
    mode="full",
    ingest_files=32,
    ingest_params=10_000_000,
    repeats=5,
    rss_sites=(8, 32, 128),
    rss_params=10_000_000,
    rss_repeats=2,
    robust_files=32,
    robust_params=10_000_000,
    latency_sites=1000,
    latency_pace_seconds=0.02,
    latency_params=16,
    overhead_sites=(100, 1000),
    overhead_large_sites=(10_000,),
    overhead_params=1_000_000,
    tiers_runs=((1000, 10),),
    tiers_large_runs=((10_000, 50),),
    tiers_params=10_000,
    overhead_transitions=4,
    encode_params=10_000_000,
    flood_sites=8,
    flood_params=1_000_000,
    flood_junk_files=10_000,
    flood_repeats=3,
    simulate_sites=(100, 1000),
    simulate_process_sites=100,
    daemon_timeout_seconds=900.0,
)

SMOKE = Sizes(
    mode="smoke",
    ingest_files=4,
    ingest_params=100_000,
    repeats=2,
    rss_sites=(2, 4),
    rss_params=100_000,
    rss_repeats=1,
    robust_files=4,
    robust_params=100_000,
    latency_sites=20,
    latency_pace_seconds=0.005,
    latency_params=16,
    overhead_sites=(10, 20),
    overhead_large_sites=(40,),
    overhead_params=100_000,
    tiers_runs=((12, 3),),
    tiers_large_runs=(),
    tiers_params=1_000,
    overhead_transitions=1,
    encode_params=100_000,
    flood_sites=2,
    flood_params=1_000,
    flood_junk_files=200,
    flood_repeats=1,
    simulate_sites=(5, 25),
    simulate_process_sites=5,
    daemon_timeout_seconds=60.0,
)


@dataclass(frozen=True)
class Row:
    """One line of the printed table."""

    bench: str
    figure: str
    value: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    verdict: str = ""


@dataclass
class Outcome:
    """What one benchmark hands back: its JSON figures and its table rows."""

    status: str  # "ok", "skipped" or "error"
    data: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    reason: str = ""

    def as_json(self) -> dict[str, Any]:
        """The benchmark's entry in latest.json."""
        out: dict[str, Any] = {"status": self.status}
        if self.reason:
            out["reason"] = self.reason
        out.update(self.data)
        out["table"] = [asdict(row) for row in self.rows]
        return out


# ---- timing ----------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of fn takes."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleaved(
    subject: Callable[[], object], baseline: Callable[[], object], repeats: int
) -> tuple[list[float], list[float]]:
    """Time subject and baseline alternately, ``repeats`` times each; return both lists of seconds."""
    subject_times: list[float] = []
    baseline_times: list[float] = []
    for _ in range(repeats):
        baseline_times.append(timed(baseline))
        subject_times.append(timed(subject))
    return subject_times, baseline_times


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linearly interpolated."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def log_time(event: dict[str, Any]) -> float:
    """Unix time of a daemon log event, from its ISO 'timestamp' field."""
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


# ---- memory ----------------------------------------------------------------------------

_STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile and RssShmem of a process, in bytes (empty if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in _STATUS_KEYS:
            out[key] = int(rest.split()[0]) * 1024
    return out


def proc_io(pid: int) -> dict[str, int]:
    """/proc/<pid>/io counters (rchar, wchar, read_bytes, write_bytes, ...), or {} if unreadable."""
    try:
        text = Path(f"/proc/{pid}/io").read_text(encoding="ascii")
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = int(value)
    return out


@dataclass(frozen=True)
class RssSample:
    """One reading of a process's memory."""

    at: float  # time.time()
    rss: int
    anon: int
    file: int
    hwm: int  # VmHWM: the peak RSS so far


class RssSampler:
    """Polls a process's /proc status in a background thread and keeps every reading."""

    def __init__(self, pid: int | str = "self", interval_seconds: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval_seconds
        self.samples: list[RssSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        """Start sampling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            status = proc_status(self.pid)
            if not status:
                return
            self.samples.append(
                RssSample(
                    time.time(),
                    status["VmRSS"],
                    status.get("RssAnon", 0),
                    status.get("RssFile", 0),
                    status.get("VmHWM", 0),
                )
            )
            self._stop.wait(self.interval)

    def peak(self, start: float = 0.0, stop: float = float("inf"), what: str = "rss") -> int:
        """Largest sampled value of rss, anon, file or hwm between two instants (0 if none)."""
        values = [getattr(s, what) for s in self.samples if start <= s.at <= stop]
        return max(values, default=0)


# Peak RSS is read as VmHWM from /proc, never as ru_maxrss: Linux carries the spawning
# process's high-water mark into a child's ru_maxrss when the child is started with vfork
# (as subprocess does), so after this process has held a few GB every child would report
# at least that. VmHWM belongs to the child's own address space, which exec starts afresh.


def self_peak_rss() -> int:
    """This process's peak RSS (VmHWM) in bytes."""
    return proc_status("self").get("VmHWM", 0)


def imports_peak_rss(module: str) -> int:
    """Peak RSS (VmHWM) of a fresh interpreter that imports ``module`` and nothing else."""
    code = f"import {module}; print(open('/proc/self/status').read())"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    for line in done.stdout.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM line in /proc/self/status")


# ---- environment -----------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii").strip()
    except OSError:
        return ""


def _blas() -> str:
    try:
        config: Any = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older numpy or an unexpected layout: not worth failing the run
        return "unknown"


def environment() -> dict[str, Any]:
    """What the figures depend on: machine, Python, numpy and its BLAS, thread env vars, git state."""
    meminfo = _read("/proc/meminfo").splitlines()
    mem_total = next((line.split()[1] for line in meminfo if line.startswith("MemTotal")), "0")
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "blas": _blas(),
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpus": os.cpu_count(),
        "mem_total_bytes": int(mem_total) * 1024,
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thread_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)},
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": len([line for line in _git("status", "--porcelain").splitlines() if line]),
    }


# ---- formatting ------------------------------------------------------------------------


def fmt_rate(gb_per_second: float) -> str:
    """A throughput in GB/s."""
    return f"{gb_per_second:.2f} GB/s"


def fmt_mib(value: int | float) -> str:
    """A size in MiB."""
    return f"{value / MIB:.0f} MiB" if value >= 10 * MIB else f"{value / MIB:.2f} MiB"


def fmt_seconds(seconds: float) -> str:
    """A duration, in ms below one second."""
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def verdict(passed: bool | None) -> str:
    """PASS, FAIL or '-' when the figure has no target."""
    if passed is None:
        return "-"
    return "PASS" if passed else "FAIL"


def render_table(rows: Iterable[Row]) -> str:
    """The rows as a fixed-width text table."""
    header = Row("bench", "figure", "measured", "baseline", "ratio", "target", "verdict")
    lines = [header, *rows]
    columns = list(zip(*[astuple_row(r) for r in lines], strict=True))
    widths = [max(len(cell) for cell in column) for column in columns]
    out = []
    for index, row in enumerate(lines):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(astuple_row(row), widths, strict=True)))
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in out)


def astuple_row(row: Row) -> tuple[str, ...]:
    """A row's cells in column order."""
    return (row.bench, row.figure, row.value, row.baseline, row.ratio, row.target, row.verdict)
