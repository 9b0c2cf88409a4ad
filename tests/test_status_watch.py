"""`fl-orchestrator status --watch`, driven by a fake clock and a fake sleep that rewrites status.json."""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fl_orchestrator.cli import status_watch
from fl_orchestrator.cli.status_watch import (
    CLEAR_SCREEN,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_STILL_RUNNING,
    file_signature,
    progress_bar,
    watch_status,
)
from fl_orchestrator.cli.tool_main import main as tool_main
from fl_orchestrator.config import EX_USAGE
from fl_orchestrator.daemon.server_app_status import ServerAppStatus

from support.jobs import site_emails

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
A, B, C = site_emails(3)


def status(**overrides: Any) -> dict[str, Any]:
    """A status.json as the daemon writes it mid-round 2 of 3, by this (live) process."""
    doc: dict[str, Any] = {
        "job": "testjob",
        "run_id": "run-1",
        "state": "running",
        "phase": "training",
        "round": 2,
        "num_rounds": 3,
        "attempt": 1,
        "dispatched_at": NOW - 8.0,
        "deadline": NOW + 12.0,
        "selected": [A, B, C],
        "answered": [A],
        "attempt_failures": {},
        "updated": NOW,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "datasites": {
            name: {"last_seen": NOW - 1, "selected": 2, "succeeded": 1, "failed": 0, "timed_out": 0}
            for name in (A, B, C)
        },
    }
    doc.update(overrides)
    return doc


# Between attempts the daemon writes no attempt, deadline or selection.
IDLE = {"attempt": None, "dispatched_at": None, "deadline": None, "selected": [], "answered": []}
DONE = {**IDLE, "state": "done", "phase": "done", "round": 3}


def write_status(state_dir: Path, doc: dict[str, Any]) -> None:
    """Replace status.json atomically, as the daemon does (a new inode each time)."""
    temp = state_dir / ".status.json.tmp"
    temp.write_text(json.dumps(doc))
    os.replace(temp, state_dir / "status.json")


class Script:
    """A fake clock and sleep: each sleep advances the clock and may write the next status.json."""

    def __init__(self, state_dir: Path, writes: dict[int, dict[str, Any]]) -> None:
        self.state_dir = state_dir
        self.writes = writes  # sleep number (1-based) -> the status written during that sleep
        self.now = NOW
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if len(self.sleeps) in self.writes:
            write_status(self.state_dir, self.writes[len(self.sleeps)])


def watch(state_dir: Path, script: Script, *, tty: bool, **options: Any) -> tuple[int, str]:
    out = io.StringIO()
    code = watch_status(
        state_dir,
        out=out,
        tty=tty,
        clock=script.clock,
        sleep=script.sleep,
        max_iterations=options.pop("max_iterations", 20),
        **options,
    )
    return code, out.getvalue()


def test_progress_bar_fills_in_proportion() -> None:
    assert progress_bar(0, 3, width=6) == "[------] 0/3"
    assert progress_bar(2, 3, width=6) == "[####--] 2/3"
    assert progress_bar(12, 12, width=4) == "[####] 12/12"
    assert progress_bar(3, 12, width=4) == "[#---]  3/12"  # counts line up from frame to frame
    assert progress_bar(0, 0, width=4) == "[----] 0/0"


def test_watch_on_a_terminal_redraws_every_interval_and_exits_0_when_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_status(tmp_path, status())
    reads: list[Path] = []
    real_read = status_watch.read_status

    def counting_read(state_dir: Path) -> tuple[Path, dict[str, Any]]:
        reads.append(state_dir)
        return real_read(state_dir)

    monkeypatch.setattr(status_watch, "read_status", counting_read)
    # Sleep 1 changes nothing (the countdown still moves); sleep 2 brings B's answer; sleep 3 the end.
    script = Script(tmp_path, {2: status(answered=[A, B], updated=NOW + 2), 3: status(**DONE)})
    code, out = watch(tmp_path, script, tty=True, interval=1.0)
    assert code == 0
    assert script.sleeps == [1.0, 1.0, 1.0]
    frames = out.split(CLEAR_SCREEN)[1:]
    assert out.startswith(CLEAR_SCREEN) and len(frames) == 4
    assert len(reads) == 3  # status.json is read again only when it changed
    first, second, third, last = frames
    assert first.startswith(f"watching {tmp_path / 'status.json'} every 1 s")
    assert "rounds   [##########--------------------] 1/3 rounds complete" in first
    assert "answered [##########--------------------] 1/3 selected datasites answered" in first
    assert "round 2 of 3, phase training, attempt 1" in first
    assert "time left in round: 12.0 s (deadline 2027-01-15T08:00:12Z)" in first
    assert "time left in round: 11.0 s" in second  # the same file, one interval later
    assert "answered [####################----------] 2/3" in third
    assert "time left in round: 10.0 s" in third
    assert any(line.startswith(A) for line in first.splitlines())  # the per-datasite table
    assert "job testjob (run run-1): done" in last
    assert "rounds   [##############################] 3/3" in last
    assert "time left" not in last and "answered [" not in last


def test_watch_elsewhere_prints_one_line_per_change(tmp_path: Path) -> None:
    write_status(tmp_path, status())
    script = Script(
        tmp_path,
        {
            1: status(updated=NOW + 1),  # a rewrite that changes nothing shown: no line
            2: status(answered=[A, B], updated=NOW + 2),
            3: status(**DONE),
        },
    )
    code, out = watch(tmp_path, script, tty=False, interval=0.5)
    assert code == 0 and CLEAR_SCREEN not in out
    assert out.splitlines() == [
        "2027-01-15T08:00:00Z job testjob: running, round 2 of 3, phase training, attempt 1,"
        " answered 1 of 3, deadline 2027-01-15T08:00:12Z",
        "2027-01-15T08:00:01Z job testjob: running, round 2 of 3, phase training, attempt 1,"
        " answered 2 of 3, deadline 2027-01-15T08:00:12Z",
        "2027-01-15T08:00:01Z job testjob: done, round 3 of 3, phase done",
    ]


def test_watch_exits_1_when_the_job_failed(tmp_path: Path) -> None:
    write_status(tmp_path, status())
    failed = status(**IDLE, state="failed", phase="failed", error="too few results")
    code, out = watch(tmp_path, Script(tmp_path, {1: failed}), tty=False)
    assert code == EXIT_FAILED
    assert out.splitlines()[-1].endswith(
        "job testjob: failed, round 2 of 3, phase failed, error: too few results"
    )


def test_watch_follows_a_custom_server_app_loop(tmp_path: Path) -> None:
    # The status.json `fl-orchestratord --server-app` writes: no rounds of ours.
    loop = ServerAppStatus(tmp_path, "my-server-app", 7, [A, B])
    counts = {A: {"sent": 2, "answered": 2}, B: {"sent": 2, "answered": 1}}
    loop.write(counts)
    loop.state = "done"
    finished = loop.document({A: {"sent": 3, "answered": 3}, B: {"sent": 3, "answered": 2, "failed": 1}})
    script = Script(tmp_path, {1: finished})
    code, out = watch(tmp_path, script, tty=True, interval=1.0)
    assert code == 0
    first, last = out.split(CLEAR_SCREEN)[1:]
    assert "replies  [######################--------] 3/4 requests answered" in first
    assert "a custom ServerApp loop (no rounds of ours), phase custom_loop" in first
    assert "rounds   [" not in first and "time left" not in first
    assert "replies  [##############################] 6/6" in last
    assert "job my-server-app (run 7): done" in last
    code, out = watch(tmp_path, Script(tmp_path, {}), tty=False)
    assert code == 0
    assert out.split(" ", 1)[1] == (
        "job my-server-app: done, custom ServerApp loop, phase done, replies 6 of 6 requests\n"
    )


def test_watch_waits_for_the_first_status_file(tmp_path: Path) -> None:
    script = Script(tmp_path, {2: status(**DONE)})
    code, out = watch(tmp_path, script, tty=False)
    assert code == 0 and len(script.sleeps) == 2
    waiting, done = out.splitlines()  # one line for the wait, not one per interval
    assert f"no status yet at {tmp_path / 'status.json'}" in waiting and waiting.endswith("waiting for it")
    assert "job testjob: done" in done


def test_watch_stops_quietly_on_ctrl_c(tmp_path: Path) -> None:
    write_status(tmp_path, status())

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    out = io.StringIO()
    code = watch_status(tmp_path, out=out, tty=True, clock=lambda: NOW, sleep=interrupted)
    assert code == EXIT_INTERRUPTED == 130
    assert out.getvalue().count(CLEAR_SCREEN) == 1 and "Traceback" not in out.getvalue()


def test_watch_gives_up_after_max_iterations_while_the_job_runs(tmp_path: Path) -> None:
    write_status(tmp_path, status())
    script = Script(tmp_path, {})
    assert watch(tmp_path, script, tty=False, max_iterations=3)[0] == EXIT_STILL_RUNNING
    assert len(script.sleeps) == 2  # no sleep after the last view


def test_watch_cuts_the_view_to_the_terminal_height(tmp_path: Path) -> None:
    many = {f"site{i:04d}@example.org": {"selected": 1} for i in range(1000)}
    write_status(tmp_path, status(**DONE, datasites=many))
    screen: Callable[[], tuple[int, int] | None] = lambda: (60, 24)  # noqa: E731
    code, out = watch(tmp_path, Script(tmp_path, {}), tty=True, screen=screen)
    frame = out.removeprefix(CLEAR_SCREEN).rstrip("\n").splitlines()
    assert code == 0 and len(frame) == 23 and max(len(line) for line in frame) == 60
    assert frame[-1].endswith("more lines: `fl-orchestrator status` shows them all")
    assert "job testjob (run run-1): done" in frame
    assert frame[0].endswith("…")  # the long folder name, cut rather than wrapped


def test_file_signature_changes_with_each_atomic_rewrite(tmp_path: Path) -> None:
    assert file_signature(tmp_path / "status.json") is None
    write_status(tmp_path, status())
    first = file_signature(tmp_path / "status.json")
    write_status(tmp_path, status())  # same bytes, new inode
    assert first is not None and file_signature(tmp_path / "status.json") not in (None, first)


def test_watch_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = ["status", "--state-dir", str(tmp_path)]
    assert tool_main([*state, "--watch", "--json"]) == EX_USAGE
    assert "--json cannot be combined with --watch" in capsys.readouterr().err
    assert tool_main([*state, "--interval-seconds", "2"]) == EX_USAGE
    assert "--interval-seconds needs --watch" in capsys.readouterr().err
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(SystemExit) as exited:
            tool_main([*state, "--watch", "--interval-seconds", bad])
        assert exited.value.code == EX_USAGE
    capsys.readouterr()
    # A finished job: the first view is the last, so no real sleep happens.
    write_status(tmp_path, status(**DONE))
    assert tool_main([*state, "--watch", "--interval-seconds", "0.2"]) == 0
    out = capsys.readouterr().out
    assert CLEAR_SCREEN not in out and out.count("\n") == 1  # captured stdout is not a terminal
    assert "job testjob: done, round 3 of 3, phase done" in out
