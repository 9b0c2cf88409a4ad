"""Benchmark 7: a datasite of the job floods its results folder with junk.

The real daemon runs a FedAvg job of N honest datasites (no-op training) and
one hostile datasite, ``hostile@bench.example.org``. The hostile datasite is
listed in the job but writes no heartbeat, so it is never selected and a round
closes on the N honest answers; its files go through the same intake as anyone's.
It floods with junk_writer.py (another process): COUNT files of random bytes
(200-1000 each, the same mix in every run), named ``<32 hex>.result``, each
written under a hidden temp name and renamed into its ``results/``, as fast as
it can. Every measurement starts a fresh daemon in a fresh folder, so each
flood meets an empty quarantine (copy mode and quarantine_max_bytes left at
their defaults, like every other limit).

1. Junk refusal rate. Round 1 is open and nobody answers; the flood is
   released. Rate = COUNT / (the last refusal of the hostile datasite's files -
   the instant of the first rename). Refusals are read from the daemon's
   quarantine records (``state/quarantine/<datasite>/records.jsonl``, one line
   per refused file with its reason and time): its log has one
   ``file.rejected`` line per refusal only up to a burst a second. Random bytes that look
   like the start of a longer message are ``truncated``, which the daemon holds
   for ``partial_file_settle_seconds`` (2 s) before refusing, in case the file
   is still being written: the rate of the files refused without that wait is
   reported beside it. Baseline, in the same run, right after each flood: a
   plain loop of lstat + open + read + write of a copy over the same files,
   in this process (the least any refusal that keeps a copy must do).
2. Honest round under flood. From the daemon's ``round.dispatched`` line of
   round 1 to its ``round.completed``, with every honest datasite answering at
   once (results staged under temp names as soon as the tasks are read, then
   renamed together): (a) with no flood, (b) with the flood released when the
   benchmark sees the dispatch. Also reported: how much of the flood had
   landed and not yet been refused when the round completed (the junk
   backlog). Honest answers land within tens of milliseconds of the dispatch,
   when only part of the flood is there, so a third case, (c), not a target,
   has them land behind the whole flood: released at the dispatch, answers
   renamed once the last junk file has landed and thousands wait to be
   refused. Its figure is last answer landed -> ``round.completed``, next to
   the same span in (a). The order of (a), (b) and (c) rotates each repetition.

Each repetition runs part 1 (then its baseline) and the three rounds of part 2;
the figures are medians over the repetitions.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from harness import Outcome, Row, Sizes, fmt_seconds, log_time, percentile, verdict
from simulator import DaemonProcess, Datasites, JobSpec, site_emails, write_job

HOSTILE = "hostile@bench.example.org"
TARGET_REFUSED_PER_SECOND = 2000.0
TARGET_EXTRA_ROUND_SECONDS = 1.0
# Refusals the intake holds back for partial_file_settle_seconds: the file may still be arriving.
HELD_REASONS = frozenset({"truncated", "empty_file"})
_WRITER = Path(__file__).with_name("junk_writer.py")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class JunkWriter:
    """junk_writer.py as a subprocess: ready before the daemon starts, floods on ``go``."""

    def __init__(self, results_dir: Path, count: int, seed: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(_WRITER), str(results_dir), str(count), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            self.stop()
            raise RuntimeError("junk_writer.py did not start")

    def go(self) -> None:
        """Release the flood."""
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def report(self, timeout_seconds: float) -> dict[str, Any]:
        """Wait for the flood to end; its names, sizes and rename instants."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        self.process.wait(timeout=timeout_seconds)
        if not line:
            raise RuntimeError(f"junk_writer.py exited {self.process.returncode} without a report")
        report: dict[str, Any] = json.loads(line)
        return report

    def stop(self) -> None:
        """End the writer if it still runs (by its pid) and reap it."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=10)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


class RefusalTally:
    """How many files of the hostile datasite the daemon has refused so far (its records).

    Counted incrementally, by the newlines appended to the records file since
    the last look: rereading 10,000 records at every log line would be quadratic.
    """

    def __init__(self, daemon: DaemonProcess, state_dir: Path) -> None:
        self.daemon = daemon
        self.records = state_dir / "quarantine" / HOSTILE / "records.jsonl"
        self.offset = 0
        self.count = 0

    def update(self) -> int:
        """The count, with the records written since the last call."""
        try:
            with open(self.records, "rb") as handle:
                handle.seek(self.offset)
                new = handle.read()
        except FileNotFoundError:
            return self.count
        whole = new.rfind(b"\n") + 1  # a line being appended is counted next time
        self.count += new.count(b"\n", 0, whole)
        self.offset += whole
        return self.count

    def wait_for(self, count: int, timeout_seconds: float) -> None:
        """Until ``count`` refusals were recorded; DaemonError if the daemon exits or stalls first."""
        if self.update() >= count:
            return
        # Any log line wakes the check; the intake logs a summary line when it runs dry.
        self.daemon.wait_for(
            lambda _event: self.update() >= count, timeout_seconds, f"{count} refusals of junk"
        )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime: fields 14, 15


def plain_copy_loop(files: list[Path], into: Path) -> float:
    """Seconds to lstat, open, read and copy each file into a fresh folder (the baseline)."""
    into.mkdir()
    started = time.perf_counter()
    for path in files:
        info = os.lstat(path)
        source = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            data = os.read(source, info.st_size + 1)
        finally:
            os.close(source)
        copy = os.open(into / path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(copy, data)
        finally:
            os.close(copy)
    return time.perf_counter() - started


def hostile_refusals(state_dir: Path) -> list[dict[str, Any]]:
    """The daemon's quarantine records of the hostile datasite's files: source, reason, at."""
    folder = state_dir / "quarantine" / HOSTILE
    records = []
    for name in ("records.1.jsonl", "records.jsonl"):
        try:
            lines = (folder / name).read_text().splitlines()
        except FileNotFoundError:
            continue
        records.extend(json.loads(line) for line in lines if line.endswith("}"))
    return records


def status_of_hostile(state_dir: Path) -> dict[str, Any]:
    """What status.json says now about the hostile datasite's refused files."""
    try:
        status = json.loads((state_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {"readable": False}
    return {
        "readable": True,
        "quarantined": sum(status.get("quarantined", {}).get(HOSTILE, {}).values()),
        "quarantine_dropped": status.get("quarantine_dropped", {}).get(HOSTILE, 0),
        "flagged": HOSTILE in status.get("flagged", []),
        "updated": status.get("updated"),
    }


def quarantine_folder(state_dir: Path) -> dict[str, int]:
    """Files and bytes the daemon wrote for the hostile datasite under state_dir/quarantine/."""
    folder = state_dir / "quarantine" / HOSTILE
    records = copies = copy_bytes = record_bytes = 0
    if folder.is_dir():
        for entry in os.scandir(folder):
            size = entry.stat(follow_symlinks=False).st_size
            if entry.name.startswith("records"):
                with open(entry.path, "rb") as handle:
                    records += handle.read().count(b"\n")
                record_bytes += size
            else:
                copies += 1
                copy_bytes += size
    return {"records": records, "record_bytes": record_bytes, "copies": copies, "copy_bytes": copy_bytes}


def lag_summary(seconds: list[float]) -> dict[str, float]:
    """p50, p99 and max of a list of seconds."""
    return {"p50": percentile(seconds, 50), "p99": percentile(seconds, 99), "max": max(seconds)}


def prepare_job(sizes: Sizes, folder: Path, num_rounds: int) -> tuple[Path, Datasites, Path]:
    """The job file, the honest datasites (heartbeats written), the hostile results folder."""
    spec = JobSpec(
        sites=sizes.flood_sites, params=sizes.flood_params, num_rounds=num_rounds, extra_datasites=(HOSTILE,)
    )
    job = write_job(folder, spec)
    sim = Datasites(folder / "syftbox", site_emails(sizes.flood_sites))
    sim.prepare()
    hostile_results = sim.layout.results_dir(HOSTILE)
    # Made before the daemon starts, so its first watch plan already covers it.
    hostile_results.mkdir(parents=True)
    return job, sim, hostile_results


def junk_refusal(sizes: Sizes, folder: Path, seed: int) -> dict[str, Any]:
    """Part 1, once: the flood into an open round nobody answers; then the baseline on the same files."""
    count = sizes.flood_junk_files
    timeout = sizes.daemon_timeout_seconds
    job, _, hostile_results = prepare_job(sizes, folder, num_rounds=1)
    writer = JunkWriter(hostile_results, count, seed)
    try:
        with DaemonProcess(job, folder / "daemon.log") as daemon:
            daemon.wait_event("round.dispatched", timeout, round=1)
            tally = RefusalTally(daemon, folder / "state")
            os.sync()
            time.sleep(0.5)
            load = os.getloadavg()[0]
            cpu_before = cpu_seconds(daemon.pid)
            writer.go()
            flood = writer.report(timeout)
            tally.wait_for(count, timeout)
            cpu_used = cpu_seconds(daemon.pid) - cpu_before
            status_at_end = status_of_hostile(folder / "state")
            # status.json is rewritten after round events, at most once a second: does a flood alone move it?
            time.sleep(2.0)
            status_later = status_of_hostile(folder / "state")
            daemon.terminate()
            exit_ = daemon.finish(timeout)
            refusals = hostile_refusals(folder / "state")
            flagged_lines = len(daemon.find("datasite.flagged", datasite=HOSTILE))
            queue_full_lines = len(daemon.find("intake.queue_full"))
    finally:
        writer.stop()
    if exit_.code != 0:
        raise RuntimeError(f"the daemon exited {exit_.code}; see {folder}/daemon.log")
    landed_at = dict(zip(flood["names"], flood["landed"], strict=True))
    first_landed = min(flood["landed"])
    refused_at = {Path(str(e["source"])).name: float(e["at"]) for e in refusals}
    reasons = Counter(str(e.get("reason")) for e in refusals)
    at_once = [float(e["at"]) for e in refusals if e.get("reason") not in HELD_REASONS]
    held = [float(e["at"]) for e in refusals if e.get("reason") in HELD_REASONS]
    last_refused = max(refused_at.values())
    # The daemon's copies and records are still being written back: let the disk settle first.
    os.sync()
    time.sleep(0.5)
    baseline_seconds = plain_copy_loop(
        [hostile_results / name for name in flood["names"]], folder / "baseline_copy"
    )
    lags = [refused_at[name] - landed_at[name] for name in landed_at if name in refused_at]
    return {
        "seed": seed,
        "load_average_1m_at_start": load,
        "files": count,
        "junk_bytes": sum(flood["sizes"]),
        "refused": len(refusals),
        "refused_distinct_files": len(refused_at),
        "reasons": dict(reasons),
        "refused_per_second": count / (last_refused - first_landed),
        "seconds_first_landed_to_last_refused": last_refused - first_landed,
        "refused_at_once": len(at_once),
        "refused_at_once_per_second": len(at_once) / (max(at_once) - first_landed) if at_once else None,
        "held_for_settle": len(held),
        "last_held_refused_after_seconds": max(held) - first_landed if held else None,
        "writer_per_second": count / (flood["ended"] - flood["started"]),
        "writer_seconds": flood["ended"] - flood["started"],
        "baseline_seconds": baseline_seconds,
        "baseline_per_second": count / baseline_seconds,
        "lag_landed_to_refused_seconds": lag_summary(lags),
        "daemon_cpu_seconds": cpu_used,
        "daemon_peak_rss_bytes": exit_.peak_rss,
        "status_json_at_last_refusal": status_at_end,
        "status_json_2s_later": status_later,
        "quarantine_folder": quarantine_folder(folder / "state"),
        "flagged_log_lines": flagged_lines,
        "queue_full_log_lines": queue_full_lines,
    }


# When the hostile datasite floods, in part 2.
NO_FLOOD = "none"
FLOOD_FROM_DISPATCH = "from_dispatch"
ANSWERS_BEHIND_FLOOD = "answers_behind_flood"


def honest_round(sizes: Sizes, folder: Path, seed: int, flood_mode: str) -> dict[str, Any]:
    """Part 2, once: round 1 with every honest datasite answering at once, with or without a flood."""
    count = sizes.flood_junk_files
    timeout = sizes.daemon_timeout_seconds
    # Two rounds: after round 1 the daemon keeps running (round 2 open), so the backlog can drain.
    job, sim, hostile_results = prepare_job(sizes, folder, num_rounds=2)
    # No-op training: any finite float32 array of the model's shape is an honest answer.
    update = {"w": np.random.default_rng(seed).normal(0, 0.01, sizes.flood_params).astype(np.float32)}
    writer = JunkWriter(hostile_results, count, seed) if flood_mode != NO_FLOOD else None
    flood: dict[str, Any] | None = None
    try:
        os.sync()
        time.sleep(0.5)
        load = os.getloadavg()[0]
        with DaemonProcess(job, folder / "daemon.log") as daemon:
            dispatched = daemon.wait_event("round.dispatched", timeout, round=1)
            if writer is not None:
                writer.go()
            tasks = sim.tasks(1, dispatched["selected"])
            staged = [sim.stage_result(task, sim.result_frames(task, update, 100)) for task in tasks]
            if writer is not None and flood_mode == ANSWERS_BEHIND_FLOOD:
                flood = writer.report(timeout)  # every junk file has landed
            landed = {item.datasite: sim.land(item) for item in staged}
            completed = daemon.wait_event("round.completed", timeout, round=1)
            if writer is not None:
                flood = flood or writer.report(timeout)
                RefusalTally(daemon, folder / "state").wait_for(count, timeout)
            daemon.terminate()
            exit_ = daemon.finish(timeout)
            accepted = daemon.find("result.accepted", round=1)
            refusals = hostile_refusals(folder / "state")
    finally:
        if writer is not None:
            writer.stop()
    if exit_.code != 0:
        raise RuntimeError(f"the daemon exited {exit_.code}; see {folder}/daemon.log")
    t_dispatched, t_completed = log_time(dispatched), log_time(completed)
    first_landed, last_landed = min(landed.values()), max(landed.values())
    accept_lags = [log_time(e) - landed[str(e["datasite"])] for e in accepted]
    out: dict[str, Any] = {
        "flood_mode": flood_mode,
        "seed": seed,
        "load_average_1m_at_start": load,
        "honest_sites": len(tasks),
        "dispatched_to_completed_seconds": t_completed - t_dispatched,
        "dispatched_to_last_landed_seconds": last_landed - t_dispatched,
        "last_landed_to_completed_seconds": t_completed - last_landed,
        "landed_to_accepted_seconds": lag_summary(accept_lags),
        "daemon_aggregate_seconds": completed.get("aggregate_seconds"),
    }
    if flood is not None:
        refused_times = sorted(float(e["at"]) for e in refusals)

        def backlog_at(instant: float) -> tuple[int, int]:
            """Junk landed by then, and of it not yet refused."""
            landed_junk = sum(1 for at in flood["landed"] if at <= instant)
            return landed_junk, landed_junk - sum(1 for at in refused_times if at <= instant)

        landed_by_completion, backlog = backlog_at(t_completed)
        out.update(
            {
                "flood_started_after_dispatch_seconds": min(flood["landed"]) - t_dispatched,
                "junk_landed_at_completion": landed_by_completion,
                "junk_backlog_at_completion": backlog,
                "junk_backlog_when_answers_landed": backlog_at(first_landed)[1],
                "last_junk_refused_after_completion_seconds": refused_times[-1] - t_completed,
                "writer_per_second": count / (flood["ended"] - flood["started"]),
            }
        )
    return out


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    """The median of one figure over runs."""
    return float(statistics.median(run[key] for run in runs))


def best_of(runs: list[dict[str, Any]], key: str, *, highest: bool = False) -> float:
    """The best of one figure over runs: the lowest time, or the highest rate."""
    values = [run[key] for run in runs]
    return float(max(values) if highest else min(values))


def fmt_per_second(value: float | None) -> str:
    """A rate in files per second."""
    return "-" if value is None else f"{value:,.0f} files/s"


def refusal_rows(runs: list[dict[str, Any]]) -> tuple[list[Row], bool]:
    """The table rows of part 1, and whether the target was met (by the median)."""
    rate = median_of(runs, "refused_per_second")
    baseline = median_of(runs, "baseline_per_second")
    passed = rate >= TARGET_REFUSED_PER_SECOND
    count = runs[0]["files"]
    at_once = [r["refused_at_once_per_second"] for r in runs if r["refused_at_once_per_second"] is not None]
    held = [r["last_held_refused_after_seconds"] for r in runs if r["last_held_refused_after_seconds"]]
    lag = [r["lag_landed_to_refused_seconds"] for r in runs]
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(runs[0]["reasons"].items()))
    cpu_per_thousand = statistics.median(r["daemon_cpu_seconds"] / r["files"] * 1000 for r in runs)
    status_counts = " / ".join(
        f"{r['status_json_at_last_refusal'].get('quarantined', '?')}"
        f" -> {r['status_json_2s_later'].get('quarantined', '?')}"
        for r in runs
    )
    folder = runs[0]["quarantine_folder"]
    rows = [
        Row(
            "7 flood",
            f"junk refused, {count:,} files: first landed -> last refused (median)",
            fmt_per_second(rate),
            f"plain lstat+open+read+copy {fmt_per_second(baseline)}",
            f"{rate / baseline:.2f}",
            f">= {TARGET_REFUSED_PER_SECOND:,.0f} files/s",
            verdict(passed),
        ),
        Row(
            "7 flood",
            "  best; seconds for all (median)",
            fmt_per_second(best_of(runs, "refused_per_second", highest=True)),
            fmt_seconds(median_of(runs, "seconds_first_landed_to_last_refused")),
        ),
        Row(
            "7 flood",
            f"  refused at once ({runs[0]['refused_at_once']} files), median",
            fmt_per_second(statistics.median(at_once) if at_once else None),
        ),
        Row(
            "7 flood",
            f"  held for the settle time ({runs[0]['held_for_settle']} files): last refused at",
            fmt_seconds(statistics.median(held)) if held else "-",
            "after the first landed",
        ),
        Row("7 flood", "  reasons (first run)", reasons),
        Row(
            "7 flood",
            "  lag landed -> refused p50 / p99 / max (median)",
            " / ".join(fmt_seconds(statistics.median(x[q] for x in lag)) for q in ("p50", "p99", "max")),
        ),
        Row(
            "7 flood",
            "  writer's own rate (create+write+rename), median",
            fmt_per_second(median_of(runs, "writer_per_second")),
        ),
        Row(
            "7 flood",
            "  daemon CPU per 1,000 junk files; peak RSS",
            f"{cpu_per_thousand:.2f} s; {max(r['daemon_peak_rss_bytes'] for r in runs) / 2**20:.0f} MiB",
        ),
        Row(
            "7 flood",
            "  status.json quarantined at last refusal -> 2 s later",
            status_counts,
            f"log: {runs[0]['refused']}",
        ),
        Row(
            "7 flood",
            "  quarantine folder: copies / records (bytes)",
            f"{folder['copies']} / {folder['records']}"
            f" ({folder['copy_bytes'] / 1e6:.1f} / {folder['record_bytes'] / 1e6:.1f} MB)",
            f"flagged lines {runs[0]['flagged_log_lines']}, queue_full {runs[0]['queue_full_log_lines']}",
        ),
    ]
    return rows, passed


def round_rows(rounds: dict[str, list[dict[str, Any]]]) -> tuple[list[Row], bool]:
    """The table rows of part 2, and whether the target was met (by the medians)."""
    quiet, flooded, behind = rounds[NO_FLOOD], rounds[FLOOD_FROM_DISPATCH], rounds[ANSWERS_BEHIND_FLOOD]
    key = "dispatched_to_completed_seconds"
    quiet_median, flooded_median = median_of(quiet, key), median_of(flooded, key)
    extra = flooded_median - quiet_median
    passed = extra <= TARGET_EXTRA_ROUND_SECONDS
    backlog = statistics.median(r["junk_backlog_at_completion"] for r in flooded)
    landed = statistics.median(r["junk_landed_at_completion"] for r in flooded)
    sites = quiet[0]["honest_sites"]
    rows = [
        Row(
            "7 flood",
            f"honest round, N={sites}: dispatched -> completed, (a) no flood (median; best)",
            f"{fmt_seconds(quiet_median)}; {fmt_seconds(best_of(quiet, key))}",
        ),
        Row(
            "7 flood",
            "  (b) junk flood from the dispatch (median; best)",
            f"{fmt_seconds(flooded_median)}; {fmt_seconds(best_of(flooded, key))}",
            f"(a) {fmt_seconds(quiet_median)}",
            f"{flooded_median / quiet_median:.2f}",
        ),
        Row(
            "7 flood",
            "  (b) - (a), medians",
            fmt_seconds(extra) if extra >= 0 else f"-{fmt_seconds(-extra)}",
            "",
            "",
            f"<= {fmt_seconds(TARGET_EXTRA_ROUND_SECONDS)}",
            verdict(passed),
        ),
    ]
    for label, runs in (("(a)", quiet), ("(b)", flooded)):
        parts = " / ".join(
            fmt_seconds(median_of(runs, k))
            for k in ("dispatched_to_last_landed_seconds", "last_landed_to_completed_seconds")
        )
        accept_max = statistics.median(r["landed_to_accepted_seconds"]["max"] for r in runs)
        rows.append(
            Row(
                "7 flood",
                f"  {label} dispatched -> last answer landed / -> completed; slowest accept",
                f"{parts}; {fmt_seconds(accept_max)}",
            )
        )
    rows.append(
        Row(
            "7 flood",
            "  (b) junk backlog at completion: landed, not yet refused (median)",
            f"{backlog:,.0f} of {landed:,.0f} landed",
            f"drained {fmt_seconds(median_of(flooded, 'last_junk_refused_after_completion_seconds'))} later",
        )
    )
    span = "last_landed_to_completed_seconds"
    behind_median, quiet_span = median_of(behind, span), median_of(quiet, span)
    rows.append(
        Row(
            "7 flood",
            "  (c) answers land after the whole flood: last landed -> completed (median)",
            fmt_seconds(behind_median),
            f"(a) {fmt_seconds(quiet_span)}",
            f"{behind_median / quiet_span:.2f}",
        )
    )
    rows.append(
        Row(
            "7 flood",
            "  (c) junk backlog when the answers landed / at completion (median)",
            f"{statistics.median(r['junk_backlog_when_answers_landed'] for r in behind):,.0f}"
            f" / {statistics.median(r['junk_backlog_at_completion'] for r in behind):,.0f}",
            "slowest accept "
            + fmt_seconds(statistics.median(r["landed_to_accepted_seconds"]["max"] for r in behind)),
        )
    )
    return rows, passed


def run(sizes: Sizes, folder: Path, shared: dict[str, Any]) -> Outcome:
    """Benchmark 7."""
    refusal_runs: list[dict[str, Any]] = []
    modes = (NO_FLOOD, FLOOD_FROM_DISPATCH, ANSWERS_BEHIND_FLOOD)
    rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    # Every measurement's folder (some 30,000 small files) is kept until the end: on this machine's
    # ext4, creating files right after tens of thousands were deleted is several times slower (the
    # inode allocator scans past the recently deleted ones), which would slow whichever came next.
    try:
        for repeat in range(sizes.flood_repeats):
            # The same seed every time: every flood is the same files, the same mix of reasons.
            refusal_runs.append(junk_refusal(sizes, folder / f"refusal{repeat}", seed=1))
            # Rotate which goes first, so that none always runs on a machine another one warmed up.
            for mode in modes[repeat % 3 :] + modes[: repeat % 3]:
                where = folder / f"round{repeat}_{mode}"
                rounds[mode].append(honest_round(sizes, where, seed=1, flood_mode=mode))
    finally:
        for measured in list(folder.iterdir()):
            shutil.rmtree(measured, ignore_errors=True)
    refusal, refusal_passed = refusal_rows(refusal_runs)
    round_table, round_passed = round_rows(rounds)
    round_key = "dispatched_to_completed_seconds"
    data: dict[str, Any] = {
        "honest_sites": sizes.flood_sites,
        "params": sizes.flood_params,
        "junk_files": sizes.flood_junk_files,
        "repeats": sizes.flood_repeats,
        "target_refused_per_second": TARGET_REFUSED_PER_SECOND,
        "target_extra_round_seconds": TARGET_EXTRA_ROUND_SECONDS,
        "refused_per_second_median": median_of(refusal_runs, "refused_per_second"),
        "baseline_per_second_median": median_of(refusal_runs, "baseline_per_second"),
        "round_seconds_no_flood_median": median_of(rounds[NO_FLOOD], round_key),
        "round_seconds_flood_median": median_of(rounds[FLOOD_FROM_DISPATCH], round_key),
        "pass_refusal_rate": refusal_passed,
        "pass_round_under_flood": round_passed,
        "refusal_runs": refusal_runs,
        "rounds": rounds,
    }
    return Outcome("ok", data, refusal + round_table)
