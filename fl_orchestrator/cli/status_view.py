"""`fl-orchestrator status`: where a job is, read from the daemon's status.json alone.

The daemon rewrites ``<state_dir>/status.json`` atomically on every transition, so
this works the same while it runs, after it stopped and after it crashed; it
never touches the SyftBox folder or the daemon.

``--json`` prints one object whose keys are stable (new keys may be added, none
is renamed or removed without changing ``format``). Times are epoch seconds;
each has an ``_iso`` companion, the same instant in UTC to the second
(``"2026-12-07T07:32:16Z"``), null when the epoch is null.

=========================  ===============================================================
key                        meaning
=========================  ===============================================================
``format``                 ``"fl-orchestrator.status/1"``
``status_file``            the status.json that was read
``now``, ``now_iso``       when this report was made
``job``, ``run_id``        the job and its run (``run_id`` null from older daemons)
``state``                  as recorded: ``running``, ``done``, ``failed`` or ``stopped``
``daemon``                 ``alive``, ``not_running`` or ``unknown`` (pid on another host)
``summary``                ``state``, or ``daemon not running (last state: running)``
``error``                  why the job failed, else null
``phase``                  ``starting``, ``waiting_for_nodes``, ``training``,
                           ``aggregating``, ``evaluating``, ``done``, ``failed``; a region
                           also ``awaiting_root`` (between rounds, until its root asks)
``round``, ``num_rounds``  round n of N
``attempt``                attempt of the open round, null between rounds
``dispatched_at``          when the open attempt was sent, else null (and
                           ``dispatched_at_iso``)
``deadline``               end of the open attempt (training) or of the wait for
                           datasites (waiting_for_nodes), else null (and ``deadline_iso``)
``seconds_left``           ``deadline - now`` (negative: overdue), null without deadline
``overdue``                ``seconds_left < 0``
``selected``               datasites asked in the open attempt
``answered``               those of them whose result (good or failed) was counted
``outstanding``            ``selected`` minus ``answered``
``attempt_failures``       datasite -> error type, failed results of the open attempt
``last_evaluate``          the latest central evaluation's metrics
``updated``                when the daemon wrote status.json (and ``updated_iso``)
``updated_seconds_ago``    ``now - updated``
``pid``, ``host``          the daemon that wrote it
``datasites``              email -> ``last_seen`` (epoch or null), ``last_seen_iso``,
                           ``last_seen_seconds_ago``, ``selected``, ``succeeded``,
                           ``failed``, ``timed_out``, ``rejected``, ``quarantined``
                           (reason -> count), ``quarantined_total``,
                           ``train_seconds_total``, ``mean_train_seconds`` (dispatch to
                           counted result, per success; null before the first success),
                           ``runner_train_seconds_total``, ``mean_runner_train_seconds``
                           (the runner's own time in its train function, per success
                           that reported it; null when none did, e.g. syft-flwr owners)
``quarantined_other``      reason counts of senders that are not datasites of the job
``flagged``                datasites the daemon flagged for files refused many times in a
                           row (status.json ``flagged``; empty from daemons without it)
``tier``                   ``root`` or ``region`` in a tiered job (docs/TIERS.md), else null
``regions``                a root's regions -> their own ``selected``, ``succeeded``,
                           ``failed``, ``timed_out`` in the last round each answered
=========================  ===============================================================
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fl_orchestrator.daemon.reports import STATUS_FILE, process_start_ticks

FORMAT = "fl-orchestrator.status/1"
EX_DATAERR = 65
EX_NOINPUT = 66

ALIVE = "alive"
NOT_RUNNING = "not_running"
UNKNOWN = "unknown"


class StatusUnavailable(Exception):
    """status.json is missing or cannot be understood; carries the exit code to use."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def read_status(state_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Load ``state_dir/status.json``; raise StatusUnavailable when missing or malformed."""
    path = state_dir / STATUS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StatusUnavailable(f"no status yet at {path}: has the daemon run?", EX_NOINPUT) from None
    except OSError as exc:
        raise StatusUnavailable(f"cannot read {path}: {exc.strerror}", EX_NOINPUT) from None
    try:
        status = json.loads(text)
    except ValueError as exc:
        raise StatusUnavailable(f"{path} is not valid JSON ({exc})", EX_DATAERR) from None
    if not isinstance(status, dict) or not isinstance(status.get("datasites", {}), dict):
        raise StatusUnavailable(f"{path} is not a status file", EX_DATAERR)
    return path, status


def daemon_liveness(status: dict[str, Any]) -> str:
    """Whether the process that wrote status.json still runs: alive, not_running or unknown."""
    pid = status.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return UNKNOWN
    host = status.get("host")
    if isinstance(host, str) and host != socket.gethostname():
        return UNKNOWN  # a state folder on shared storage: that pid means nothing here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return NOT_RUNNING
    except PermissionError:
        pass  # exists, owned by another user (the service account)
    except OSError:
        return UNKNOWN
    recorded = status.get("pid_start_ticks")
    if isinstance(recorded, int):
        actual = process_start_ticks(pid)
        if actual is not None and actual != recorded:
            return NOT_RUNNING  # the pid was reused by a process started later
    return ALIVE


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _count(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)  # a count that went through a float-only encoder
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def iso_utc(epoch: float | None) -> str | None:
    """``epoch`` as UTC ISO-8601 to the second ("2026-12-07T07:32:16Z"); None for None."""
    if epoch is None:
        return None
    try:
        return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return None  # a hand-edited or foreign status.json: show no time rather than fail


def _str_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _reason_counts(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(k): _count(v) for k, v in sorted(value.items())}


def status_document(
    status: dict[str, Any], *, now: float, status_path: Path, liveness: str | None = None
) -> dict[str, Any]:
    """The stable ``--json`` object (see the module docstring) for one status.json."""
    live = daemon_liveness(status) if liveness is None else liveness
    state = str(status.get("state", "unknown"))
    summary = state
    if state == "running" and live == NOT_RUNNING:
        summary = "daemon not running (last state: running)"
    deadline = _number(status.get("deadline"))
    seconds_left = None if deadline is None else deadline - now
    updated = _number(status.get("updated"))
    dispatched_at = _number(status.get("dispatched_at"))
    selected = _str_list(status.get("selected"))
    answered = _str_list(status.get("answered"))
    quarantined = status.get("quarantined")
    quarantined = quarantined if isinstance(quarantined, dict) else {}
    datasites: dict[str, dict[str, Any]] = {}
    for name, record in sorted(status.get("datasites", {}).items()):
        record = record if isinstance(record, dict) else {}
        last_seen = _number(record.get("last_seen"))
        succeeded = _count(record.get("succeeded"))
        train_total = _number(record.get("train_seconds_total")) or 0.0
        runner_total = _number(record.get("runner_train_seconds_total")) or 0.0
        runner_timed = _count(record.get("runner_timed"))
        reasons = _reason_counts(quarantined.get(name))
        datasites[name] = {
            "last_seen": last_seen,
            "last_seen_iso": iso_utc(last_seen),
            "last_seen_seconds_ago": None if last_seen is None else now - last_seen,
            "selected": _count(record.get("selected")),
            "succeeded": succeeded,
            "failed": _count(record.get("failed")),
            "timed_out": _count(record.get("timed_out")),
            "rejected": _count(record.get("rejected")),
            "quarantined": reasons,
            "quarantined_total": sum(reasons.values()),
            "train_seconds_total": train_total,
            "mean_train_seconds": train_total / succeeded if succeeded else None,
            "runner_train_seconds_total": runner_total,
            "mean_runner_train_seconds": runner_total / runner_timed if runner_timed else None,
        }
    failures = status.get("attempt_failures")
    last_evaluate = status.get("last_evaluate")
    return {
        "format": FORMAT,
        "status_file": str(status_path),
        "now": now,
        "now_iso": iso_utc(now),
        "job": status.get("job"),
        "run_id": status.get("run_id"),
        "state": state,
        "daemon": live,
        "summary": summary,
        "error": status.get("error"),
        "phase": status.get("phase"),
        "round": status.get("round"),
        "num_rounds": status.get("num_rounds"),
        "attempt": status.get("attempt"),
        "dispatched_at": dispatched_at,
        "dispatched_at_iso": iso_utc(dispatched_at),
        "deadline": deadline,
        "deadline_iso": iso_utc(deadline),
        "seconds_left": seconds_left,
        "overdue": seconds_left is not None and seconds_left < 0,
        "selected": selected,
        "answered": answered,
        "outstanding": [d for d in selected if d not in answered],
        "attempt_failures": {str(k): str(v) for k, v in sorted(failures.items())}
        if isinstance(failures, dict)
        else {},
        "last_evaluate": last_evaluate if isinstance(last_evaluate, dict) else {},
        "updated": updated,
        "updated_iso": iso_utc(updated),
        "updated_seconds_ago": None if updated is None else now - updated,
        "pid": status.get("pid"),
        "host": status.get("host"),
        "datasites": datasites,
        "quarantined_other": {
            str(k): _reason_counts(v) for k, v in sorted(quarantined.items()) if k not in datasites
        },
        "flagged": sorted(_str_list(status.get("flagged"))),
        "tier": status.get("tier") if isinstance(status.get("tier"), str) else None,
        "regions": _regions(status.get("regions")),
    }


def _regions(raw: object) -> dict[str, dict[str, int]]:
    """A root's regions and their own counts of their last answered round (docs/TIERS.md)."""
    if not isinstance(raw, dict):
        return {}
    return {
        str(name): {str(k): int(v) for k, v in counts.items() if isinstance(v, int | float)}
        for name, counts in sorted(raw.items())
        if isinstance(counts, dict)
    }


def format_duration(seconds: float) -> str:
    """A short human duration: '3.2 s', '4 min 05 s', '2 h 03 min', '3 d 04 h'."""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600:02d} h"


def format_ago(seconds: float | None) -> str:
    """'3.2 s ago', or 'never' for a datasite not seen since the daemon started."""
    if seconds is None:
        return "never"
    if seconds < 0.05:
        return "just now"  # includes small clock skew between writer and reader
    return f"{format_duration(seconds)} ago"


def _emails(names: list[str]) -> str:
    return ", ".join(names) if names else "-"


def render_text(doc: dict[str, Any]) -> str:
    """The human view of a status_document."""
    lines: list[str] = []
    run = f" (run {doc['run_id']})" if doc.get("run_id") else ""
    tier = f" ({doc['tier']})" if doc.get("tier") else ""
    lines.append(f"job {doc['job']}{tier}{run}: {doc['summary']}")
    if doc["daemon"] == UNKNOWN and doc["state"] == "running":
        lines.append(f"  (pid {doc['pid']} on host {doc['host']}: cannot check from here whether it runs)")
    where = f"round {doc['round']} of {doc['num_rounds']}, phase {doc['phase']}"
    if doc["round"] is None:
        where = f"a custom ServerApp loop (no rounds of ours), phase {doc['phase']}"
    if doc["attempt"] is not None:
        where += f", attempt {doc['attempt']}"
    lines.append(f"  {where}")
    if doc["error"]:
        lines.append(f"  error: {doc['error']}")
    live = doc["state"] == "running" and doc["daemon"] != NOT_RUNNING
    left = doc["seconds_left"]
    if live and left is not None:
        label = "waiting for datasites" if doc["phase"] == "waiting_for_nodes" else "time left in round"
        shown = f"overdue by {format_duration(left)}" if left < 0 else format_duration(left)
        lines.append(f"  {label}: {shown} (deadline {doc['deadline_iso']})")
    if doc["selected"]:
        lines.append(f"  selected ({len(doc['selected'])}): {_emails(doc['selected'])}")
        answered = [
            f"{d} (failed: {doc['attempt_failures'][d]})" if d in doc["attempt_failures"] else d
            for d in doc["answered"]
        ]
        lines.append(f"  answered ({len(answered)} of {len(doc['selected'])}): {_emails(answered)}")
        if live and doc["outstanding"]:
            lines.append(f"  waiting for: {_emails(doc['outstanding'])}")
    if doc["last_evaluate"]:
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}"
            for k, v in sorted(doc["last_evaluate"].items())
        )
        lines.append(f"  last evaluation: {shown}")
    if doc["updated_seconds_ago"] is not None:
        lines.append(
            f"  status written {format_ago(doc['updated_seconds_ago'])} by pid {doc['pid']}"
            + (f" on {doc['host']}" if doc.get("host") else "")
        )
    lines.append("")
    lines.extend(_datasite_table(doc["datasites"]))
    breakdown = [
        f"  {name}: " + ", ".join(f"{reason} {n}" for reason, n in record["quarantined"].items())
        for name, record in doc["datasites"].items()
        if record["quarantined"]
    ]
    breakdown += [
        f"  {name} (not in this job): " + ", ".join(f"{reason} {n}" for reason, n in reasons.items())
        for name, reasons in doc["quarantined_other"].items()
    ]
    if breakdown:
        lines.append("quarantined files by reason:")
        lines.extend(breakdown)
    if doc["flagged"]:
        lines.append(f"flagged for repeatedly refused files: {_emails(doc['flagged'])}")
    if doc["regions"]:
        lines.append("regions, their own datasites in the last round they answered:")
        lines.extend(
            f"  {name}: selected {c.get('selected', 0)}, results {c.get('succeeded', 0)},"
            f" failures {c.get('failed', 0)}, timeouts {c.get('timed_out', 0)}"
            for name, c in doc["regions"].items()
        )
    return "\n".join(lines)


def _seconds(mean: float | None) -> str:
    return "-" if mean is None else format_duration(mean) if mean >= 60 else f"{mean:.3g} s"


def _datasite_table(datasites: dict[str, dict[str, Any]]) -> list[str]:
    header = (
        "datasite",
        "last seen",
        "selected",
        "results",
        "failures",
        "timeouts",
        "rejected",
        "quarantined",
        "mean train",
        "turnaround",
    )
    rows = [header]
    for name, r in datasites.items():
        rows.append(
            (
                name,
                format_ago(r["last_seen_seconds_ago"]),
                str(r["selected"]),
                str(r["succeeded"]),
                str(r["failed"]),
                str(r["timed_out"]),
                str(r["rejected"]),
                str(r["quarantined_total"]),
                # The runner's own time in train(); turnaround is dispatch to counted result.
                _seconds(r["mean_runner_train_seconds"]),
                _seconds(r["mean_train_seconds"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    out = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)
        ]
        out.append("  ".join(cells).rstrip())
    return out


def show_status(state_dir: Path, *, as_json: bool, now: float | None = None) -> tuple[int, str]:
    """Exit code and text (stdout on 0, stderr otherwise) of `fl-orchestrator status`."""
    try:
        path, status = read_status(state_dir)
    except StatusUnavailable as exc:
        return exc.exit_code, str(exc)
    doc = status_document(status, now=time.time() if now is None else now, status_path=path)
    if as_json:
        return 0, json.dumps(doc, indent=2, sort_keys=True)
    return 0, render_text(doc)
