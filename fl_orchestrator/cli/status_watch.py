"""`fl-orchestrator status --watch`: the status view, kept current while a job runs.

The daemon rewrites ``<state_dir>/status.json`` atomically (a new inode each
time), so a plain ``os.stat`` once an interval tells a new version from the
last one without a file watcher. On a terminal the whole view is redrawn every
interval, so the time left counts down between writes; anywhere else (a pipe, a
log file) one line is printed each time the summary changes, which keeps the
output a readable log. Watching ends with the job: 0 when it is done, 1 when it
failed, 130 on Ctrl-C. A stopped or dead daemon does not end it: restarted, the
daemon resumes the job, and the view says meanwhile that nobody is running it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from fl_orchestrator.cli.status_view import (
    StatusUnavailable,
    iso_utc,
    read_status,
    render_text,
    status_document,
)
from fl_orchestrator.daemon.reports import STATUS_FILE

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C
EXIT_STILL_RUNNING = 75  # EX_TEMPFAIL: max_iterations ran out before the job ended
CLEAR_SCREEN = "\x1b[H\x1b[2J"
BAR_WIDTH = 30
_FINAL = {"done": EXIT_DONE, "failed": EXIT_FAILED}

Signature = tuple[int, int, int]


def file_signature(path: Path) -> Signature | None:
    """(inode, mtime in ns, size) of path, or None when it cannot be stat'ed."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """``[#########---------]  3/6`` (an empty bar when total is 0)."""
    filled = 0 if total <= 0 else round(width * min(done, total) / total)
    return f"[{'#' * filled}{'-' * (width - filled)}] {done:>{len(str(total))}}/{total}"


def _custom_loop_counts(doc: dict[str, Any]) -> tuple[int, int]:
    """(replies, requests) over all owners: a custom loop has no attempt to measure."""
    sites = doc["datasites"].values()
    return sum(s["succeeded"] + s["failed"] for s in sites), sum(s["selected"] for s in sites)


def progress_lines(doc: dict[str, Any]) -> list[str]:
    """Bars for the rounds done and the open attempt's answers (or a custom loop's replies)."""
    if doc["round"] is None:
        replies, requests = _custom_loop_counts(doc)
        return [f"  replies  {progress_bar(replies, requests)} requests answered"] if requests else []
    lines = []
    total = doc["num_rounds"]
    if isinstance(total, int) and isinstance(doc["round"], int) and total > 0:
        # status.json's round is the open one; it is complete only once the job is done.
        done = total if doc["state"] == "done" else doc["round"] - 1
        lines.append(f"  rounds   {progress_bar(done, total)} rounds complete")
    if doc["selected"]:
        answered = progress_bar(len(doc["answered"]), len(doc["selected"]))
        lines.append(f"  answered {answered} selected datasites answered")
    return lines


def summary_line(doc: dict[str, Any]) -> str:
    """One line for a log: state, where the job is and who answered; no clock-dependent parts."""
    parts = [f"job {doc['job']}: {doc['summary']}"]
    if doc["round"] is None:
        parts.append("custom ServerApp loop")
    else:
        parts.append(f"round {doc['round']} of {doc['num_rounds']}")
    parts.append(f"phase {doc['phase']}")
    if doc["attempt"] is not None:
        parts.append(f"attempt {doc['attempt']}")
    if doc["selected"]:
        parts.append(f"answered {len(doc['answered'])} of {len(doc['selected'])}")
    if doc["round"] is None:
        replies, requests = _custom_loop_counts(doc)
        if requests:
            parts.append(f"replies {replies} of {requests} requests")
    # The deadline, not the time left: the line is printed only when it changes.
    if doc["deadline_iso"] and doc["state"] == "running":
        parts.append(f"deadline {doc['deadline_iso']}")
    if doc["error"]:
        parts.append(f"error: {doc['error']}")
    return ", ".join(parts)


def render_frame(doc: dict[str, Any], *, interval: float, screen: tuple[int, int] | None = None) -> str:
    """The terminal view: a header, the progress bars and render_text, fitted to screen (columns, lines)."""
    lines = [
        f"watching {doc['status_file']} every {interval:g} s, Ctrl-C to stop ({doc['now_iso']})",
        *progress_lines(doc),
        "",
        *render_text(doc).splitlines(),
    ]
    if screen is None:
        return "\n".join(lines)
    columns, height = screen
    if height >= 8 and len(lines) > height - 1:
        # Lines past the bottom would scroll the top (job, round, time left) off screen.
        cut = len(lines) - (height - 2)
        lines = [*lines[: height - 2], f"... {cut} more lines: `fl-orchestrator status` shows them all"]
    if columns >= 20:
        # A wrapped line (1,000 selected datasites) would take many screen lines.
        lines = [line if len(line) <= columns else line[: columns - 1] + "…" for line in lines]
    return "\n".join(lines)


def watch_status(
    state_dir: Path,
    *,
    out: TextIO,
    tty: bool,
    interval: float = 1.0,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    max_iterations: int | None = None,
    screen: Callable[[], tuple[int, int] | None] = lambda: None,
) -> int:
    """Redraw (tty) or log (not a tty) state_dir's status until the job ends; return the exit code.

    status.json is re-read only when its stat signature changes; the view is
    rebuilt every iteration at ``clock()``, then ``sleep(interval)``; on a tty it
    is fitted to ``screen()``, the terminal's (columns, lines). A missing
    or unreadable file is shown and waited out (the daemon may not have started
    yet). Returns 0 (done), 1 (failed), 130 (Ctrl-C), or 75 once
    ``max_iterations`` views were made before the job ended.
    """
    path = state_dir / STATUS_FILE
    signature: Signature | None = None
    status: dict[str, Any] | None = None
    problem = ""
    printed: str | None = None
    iterations = 0
    try:
        while True:
            current = file_signature(path)
            if iterations == 0 or current != signature:
                signature = current
                try:
                    status = read_status(state_dir)[1]
                except StatusUnavailable as exc:
                    status, problem = None, f"{exc}; waiting for it"
            now = clock()
            doc = None if status is None else status_document(status, now=now, status_path=path)
            if tty:
                frame = problem if doc is None else render_frame(doc, interval=interval, screen=screen())
                out.write(f"{CLEAR_SCREEN}{frame}\n")
                out.flush()
            else:
                line = problem if doc is None else summary_line(doc)
                if line != printed:
                    print(f"{iso_utc(now)} {line}", file=out, flush=True)
                    printed = line
            if doc is not None and doc["state"] in _FINAL:
                return _FINAL[doc["state"]]
            iterations += 1
            if max_iterations is not None and iterations >= max_iterations:
                return EXIT_STILL_RUNNING
            sleep(interval)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
