"""The operator's tools: `fl-orchestrator status`, `report` and `init`."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from fl_orchestrator.cli.report import EX_UNAVAILABLE, INSTALL_HINT
from fl_orchestrator.cli.status_view import FORMAT, show_status
from fl_orchestrator.cli.tool_main import main as tool_main
from fl_orchestrator.config import EX_CONFIG, load_config
from fl_orchestrator.core.events import NodeSeen, ResultReceived, Started
from fl_orchestrator.core.machine import RoundMachine, RoundRules
from fl_orchestrator.daemon.lifecycle import EXIT_DONE, Daemon
from fl_orchestrator.daemon.reports import Reports, process_start_ticks
from fl_orchestrator.datasite.runner import DatasiteRunner, RunnerSettings
from fl_orchestrator.wire.layout import JobLayout

from support import scripted
from support.jobs import AGGREGATOR, job_table, site_emails, write_job
from support.records import round_line

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
NEEDS_MATPLOTLIB = pytest.mark.skipif(
    not HAS_MATPLOTLIB, reason=f"matplotlib is not installed (optional extra: {INSTALL_HINT})"
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NOW = 1_800_000_000.0
A, B, C = site_emails(3)

STATUS_KEYS = {
    "format",
    "status_file",
    "now",
    "now_iso",
    "job",
    "run_id",
    "state",
    "daemon",
    "summary",
    "error",
    "phase",
    "round",
    "num_rounds",
    "attempt",
    "dispatched_at",
    "dispatched_at_iso",
    "deadline",
    "deadline_iso",
    "seconds_left",
    "overdue",
    "selected",
    "answered",
    "outstanding",
    "attempt_failures",
    "last_evaluate",
    "updated",
    "updated_iso",
    "updated_seconds_ago",
    "pid",
    "host",
    "datasites",
    "quarantined_other",
    "flagged",
    "tier",
    "regions",
}
DATASITE_KEYS = {
    "last_seen",
    "last_seen_iso",
    "last_seen_seconds_ago",
    "selected",
    "succeeded",
    "failed",
    "timed_out",
    "rejected",
    "quarantined",
    "quarantined_total",
    "train_seconds_total",
    "mean_train_seconds",
    "runner_train_seconds_total",
    "mean_runner_train_seconds",
}


# ---- status on synthetic status.json ------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def record(**values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "last_seen": None,
        "selected": 0,
        "succeeded": 0,
        "failed": 0,
        "timed_out": 0,
        "rejected": 0,
        "train_seconds_total": 0.0,
    }
    base.update(values)
    return base


def status_file(state_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A status.json as the daemon writes it mid-round, by this (live) process."""
    status: dict[str, Any] = {
        "job": "testjob",
        "run_id": "run-1",
        "state": "running",
        "phase": "training",
        "round": 2,
        "num_rounds": 5,
        "attempt": 1,
        "dispatched_at": NOW - 8.0,
        "deadline": NOW + 12.0,
        "selected": [A, B, C],
        "answered": [A, B],
        "attempt_failures": {B: "ValueError"},
        "updated": NOW - 1.0,
        "pid": os.getpid(),
        "pid_start_ticks": process_start_ticks(os.getpid()),
        "host": socket.gethostname(),
        "datasites": {
            A: record(
                last_seen=NOW - 3.2,
                selected=2,
                succeeded=2,
                train_seconds_total=3.0,
                runner_train_seconds_total=1.0,
                runner_timed=2,
            ),
            B: record(last_seen=NOW - 75.0, selected=2, succeeded=1, failed=1, train_seconds_total=4.0),
            C: record(selected=2, timed_out=1, rejected=1),
        },
        "quarantined": {C: {"round_closed": 1}, "mallory@example.org": {"unknown_datasite": 2}},
        "last_evaluate": {"accuracy": 0.91234},
    }
    status.update(overrides)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "status.json").write_text(json.dumps(status))
    return status


def status_text(state_dir: Path) -> str:
    code, text = show_status(state_dir, as_json=False, now=NOW)
    assert code == 0, text
    return text


def status_json(state_dir: Path) -> dict[str, Any]:
    code, text = show_status(state_dir, as_json=True, now=NOW)
    assert code == 0, text
    doc: dict[str, Any] = json.loads(text)
    return doc


def test_status_of_a_running_round_shows_time_left_selection_and_accounting(tmp_path: Path) -> None:
    status_file(tmp_path)
    text = status_text(tmp_path)
    lines = text.splitlines()
    assert lines[0] == "job testjob (run run-1): running"
    assert "round 2 of 5, phase training, attempt 1" in text
    assert "time left in round: 12.0 s (deadline 2027-01-15T08:00:12Z)" in text
    assert f"selected (3): {A}, {B}, {C}" in text
    assert f"answered (2 of 3): {A}, {B} (failed: ValueError)" in text
    assert f"waiting for: {C}" in text
    assert "last evaluation: accuracy 0.9123" in text
    row_a = next(line for line in lines if line.startswith(A))
    # Its runner trained 0.5 s a round (1.0 s over 2); dispatch to result took 1.5 s (3.0 s over 2).
    assert "3.2 s ago" in row_a and row_a.split()[-4:] == ["0.5", "s", "1.5", "s"]
    row_b = next(line for line in lines if line.startswith(B))
    assert "1 min 15 s ago" in row_b
    row_c = next(line for line in lines if line.startswith(C))
    assert "never" in row_c and row_c.split()[-2:] == ["-", "-"]  # no result yet: no times
    assert f"{C}: round_closed 1" in text
    assert "mallory@example.org (not in this job): unknown_datasite 2" in text
    assert "flagged" not in text
    status_file(tmp_path, flagged=[C])
    assert status_text(tmp_path).endswith(f"flagged for repeatedly refused files: {C}")


def test_status_says_overdue_when_the_deadline_has_passed(tmp_path: Path) -> None:
    status_file(tmp_path, deadline=NOW - 2.5)
    assert "time left in round: overdue by 2.5 s (deadline 2027-01-15T07:59:57Z)" in status_text(tmp_path)
    doc = status_json(tmp_path)
    assert doc["seconds_left"] == pytest.approx(-2.5) and doc["overdue"] is True


def test_status_while_waiting_for_datasites_names_that_deadline(tmp_path: Path) -> None:
    status_file(
        tmp_path, phase="waiting_for_nodes", attempt=None, selected=[], answered=[], deadline=NOW + 300
    )
    text = status_text(tmp_path)
    assert "waiting for datasites: 5 min 00 s (deadline 2027-01-15T08:05:00Z)" in text
    assert "selected" not in text.split("\n\n")[0]


def test_status_of_a_finished_job_after_the_daemon_exited(tmp_path: Path) -> None:
    status_file(
        tmp_path,
        state="done",
        phase="done",
        round=5,
        attempt=None,
        deadline=None,
        selected=[],
        answered=[],
        pid=dead_pid(),
    )
    text = status_text(tmp_path)
    assert text.splitlines()[0] == "job testjob (run run-1): done"
    assert "round 5 of 5, phase done" in text
    assert "time left" not in text and "not running" not in text
    doc = status_json(tmp_path)
    assert doc["state"] == "done" and doc["summary"] == "done" and doc["daemon"] == "not_running"


def test_status_of_a_running_job_whose_daemon_died(tmp_path: Path) -> None:
    status_file(tmp_path, pid=dead_pid())
    text = status_text(tmp_path)
    assert text.splitlines()[0] == "job testjob (run run-1): daemon not running (last state: running)"
    assert "time left" not in text and "waiting for:" not in text  # nobody is waiting any more
    doc = status_json(tmp_path)
    assert doc["state"] == "running" and doc["daemon"] == "not_running"
    assert doc["summary"] == "daemon not running (last state: running)"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc for process start times")
def test_status_tells_a_reused_pid_from_the_daemon(tmp_path: Path) -> None:
    ticks = process_start_ticks(os.getpid())
    assert ticks is not None
    status_file(tmp_path, pid_start_ticks=ticks - 1)  # our pid, but "started" earlier: not us
    assert status_json(tmp_path)["daemon"] == "not_running"


def test_status_written_on_another_host_is_not_judged_by_pid(tmp_path: Path) -> None:
    status_file(tmp_path, pid=dead_pid(), host="elsewhere.invalid")
    doc = status_json(tmp_path)
    assert doc["daemon"] == "unknown" and doc["summary"] == "running"
    assert "cannot check from here" in status_text(tmp_path)


def test_status_json_keys_are_stable(tmp_path: Path) -> None:
    status_file(tmp_path)
    doc = status_json(tmp_path)
    assert set(doc) == STATUS_KEYS
    assert doc["format"] == FORMAT
    assert doc["status_file"] == str(tmp_path / "status.json")
    assert doc["daemon"] == "alive" and doc["summary"] == "running"
    assert doc["outstanding"] == [C]
    assert doc["seconds_left"] == pytest.approx(12.0) and doc["overdue"] is False
    assert doc["updated_seconds_ago"] == pytest.approx(1.0)
    for values in doc["datasites"].values():
        assert set(values) == DATASITE_KEYS
    a, c = doc["datasites"][A], doc["datasites"][C]
    assert a["last_seen_seconds_ago"] == pytest.approx(3.2)
    assert a["mean_train_seconds"] == pytest.approx(1.5)
    assert c["last_seen"] is None and c["last_seen_seconds_ago"] is None and c["mean_train_seconds"] is None
    assert c["quarantined"] == {"round_closed": 1} and c["quarantined_total"] == 1
    assert doc["quarantined_other"] == {"mallory@example.org": {"unknown_datasite": 2}}


def test_status_json_gives_each_epoch_time_an_iso_companion_in_utc(tmp_path: Path) -> None:
    status_file(tmp_path, datasites={A: record(last_seen=NOW - 3.2), C: record()})
    doc = status_json(tmp_path)
    assert doc["now"] == NOW and doc["now_iso"] == "2027-01-15T08:00:00Z"
    assert doc["dispatched_at_iso"] == "2027-01-15T07:59:52Z"  # NOW - 8 s
    assert doc["deadline_iso"] == "2027-01-15T08:00:12Z"
    assert doc["updated_iso"] == "2027-01-15T07:59:59Z"
    assert doc["datasites"][A]["last_seen_iso"] == "2027-01-15T07:59:56Z"  # 3.2 s before, to the second
    assert doc["datasites"][C]["last_seen"] is None and doc["datasites"][C]["last_seen_iso"] is None
    status_file(tmp_path, state="done", phase="done", attempt=None, dispatched_at=None, deadline=None)
    doc = status_json(tmp_path)
    assert (doc["deadline"], doc["deadline_iso"]) == (None, None)
    assert (doc["dispatched_at"], doc["dispatched_at_iso"]) == (None, None)
    # A time no calendar holds (a hand-edited file) has no ISO form; the report still works.
    status_file(tmp_path, updated=1e20)
    assert status_json(tmp_path)["updated_iso"] is None


def test_status_json_tolerates_a_status_file_from_an_older_daemon(tmp_path: Path) -> None:
    older = status_file(tmp_path)
    for key in ("run_id", "dispatched_at", "attempt_failures", "host", "pid_start_ticks", "quarantined"):
        del older[key]
    (tmp_path / "status.json").write_text(json.dumps(older))
    doc = status_json(tmp_path)
    assert set(doc) == STATUS_KEYS
    assert doc["run_id"] is None and doc["attempt_failures"] == {} and doc["daemon"] == "alive"
    assert doc["flagged"] == [] and doc["quarantined_other"] == {}
    assert status_text(tmp_path).startswith("job testjob: running")


def job_for(tmp_path: Path) -> Path:
    return write_job(tmp_path, job_table(3))


def test_status_without_status_file_exits_66(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = job_for(tmp_path)
    assert tool_main(["status", "--config", str(job)]) == 66
    err = capsys.readouterr().err
    assert "no status yet at" in err and str(tmp_path / "state" / "status.json") in err


def test_status_with_a_garbled_file_exits_65(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = job_for(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "status.json").write_text("{not json")
    assert tool_main(["status", "--config", str(job), "--json"]) == 65
    assert "not valid JSON" in capsys.readouterr().err


def test_status_command_prints_json_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = job_for(tmp_path)
    status_file(tmp_path / "state")
    assert tool_main(["status", "--config", str(job), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == STATUS_KEYS


def test_reports_write_what_status_needs(tmp_path: Path) -> None:
    rules = RoundRules(
        run_id="r1",
        datasites=(A, B, C),
        num_rounds=3,
        round_timeout_seconds=10.0,
        fraction_train=1.0,
        min_train_nodes=2,
        min_available_nodes=3,
        available_timeout_seconds=60.0,
        max_round_retries=0,
        presence_ttl_seconds=30.0,
        selection_seed=0,
    )
    machine = RoundMachine(rules)
    machine.handle(Started(NOW))
    for site in (A, B, C):
        machine.handle(NodeSeen(NOW + 1, site))
    assert machine.current is not None
    task = machine.current.tasks[B]
    machine.handle(ResultReceived(NOW + 2, B, 1, task, ok=False, error_type="ValueError", error_message="x"))
    reports = Reports(tmp_path, "testjob")
    reports.write_status_document(
        reports.status_document(machine, now=NOW + 3, state="running", extra={"quarantined": {}})
    )
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["run_id"] == "r1" and status["dispatched_at"] == NOW + 1
    assert status["deadline"] == NOW + 11 and status["attempt_failures"] == {B: "ValueError"}
    assert status["answered"] == [B] and status["pid"] == os.getpid()
    assert status["host"] == socket.gethostname()
    assert status["pid_start_ticks"] == process_start_ticks(os.getpid())
    assert status["datasites"][A]["last_seen"] == NOW + 1


# ---- report -------------------------------------------------------------------------------


def metrics_line(rnd: int, **overrides: Any) -> str:
    evaluate = {"accuracy": 0.5 + rnd / 10, "num_examples": 100.0}
    return json.dumps(round_line(rnd, **{"evaluate_metrics": evaluate, "written": NOW, **overrides}))


def write_metrics(state_dir: Path, lines: list[str]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.integration  # draws with matplotlib (~1 s): in make test, out of make test-fast
@NEEDS_MATPLOTLIB
def test_report_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = job_for(tmp_path)
    lines = [metrics_line(1), metrics_line(2, attempt=2, failed={C: "ValueError"}, timed_out=[])]
    write_metrics(tmp_path / "state", [*lines, '{"round": 3, "att'])  # a torn last line is skipped
    out = tmp_path / "report.png"
    assert tool_main(["report", "--config", str(job), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    printed = capsys.readouterr()
    assert "rounds 1..2" in printed.out
    assert "metrics.jsonl:3: skipped a line that is not JSON" in printed.err


@pytest.mark.integration  # draws with matplotlib: in make test, out of make test-fast
@NEEDS_MATPLOTLIB
def test_report_of_a_long_job_and_of_one_without_metrics(tmp_path: Path) -> None:
    job = job_for(tmp_path)
    write_metrics(tmp_path / "state", [metrics_line(r) for r in range(1, 201)])  # areas, not bars
    assert tool_main(["report", "--config", str(job), "--out", str(tmp_path / "long.png")]) == 0
    assert (tmp_path / "long.png").read_bytes().startswith(PNG_MAGIC)
    bare = [metrics_line(1, train_metrics={}, evaluate_metrics={})]
    write_metrics(tmp_path / "state", bare)
    assert tool_main(["report", "--config", str(job), "--out", str(tmp_path / "bare.png")]) == 0
    assert (tmp_path / "bare.png").read_bytes().startswith(PNG_MAGIC)


def test_report_without_matplotlib_exits_69(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job = job_for(tmp_path)
    write_metrics(tmp_path / "state", [metrics_line(1)])
    # A None entry in sys.modules makes `import matplotlib` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "report.png"
    assert tool_main(["report", "--config", str(job), "--out", str(out)]) == EX_UNAVAILABLE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'fl-orchestrator[plot]'" in err
    assert not out.exists()


@NEEDS_MATPLOTLIB
def test_report_without_completed_rounds_exits_66(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = job_for(tmp_path)
    assert tool_main(["report", "--config", str(job), "--out", str(tmp_path / "r.png")]) == 66
    assert "no metrics yet" in capsys.readouterr().err


# ---- init ---------------------------------------------------------------------------------


def init_args(out: Path, *extra: str) -> list[str]:
    return [
        "init",
        "--out",
        str(out),
        "--name",
        "mnist-cnn",
        "--aggregator",
        AGGREGATOR,
        *[arg for site in (A, B, C) for arg in ("--datasite", site)],
        "--syftbox-root",
        str(out.parent / "syftbox"),
        "--state-dir",
        str(out.parent / "state"),
        *extra,
    ]


def test_init_round_trips_through_load_config(tmp_path: Path) -> None:
    out = tmp_path / "job.toml"
    extra = ["--num-rounds", "7", "--round-timeout-seconds", "90", "--array", "w=784,10", "--array", "b=10"]
    assert tool_main(init_args(out, *extra)) == 0
    config = load_config(out)
    assert config.job.name == "mnist-cnn" and config.job.num_rounds == 7
    assert config.job.round_timeout_seconds == 90.0
    assert config.job.min_available_nodes == 3 and config.job.min_train_nodes == 2
    assert config.syftbox.aggregator_email == AGGREGATOR and config.syftbox.datasites == (A, B, C)
    assert config.syftbox.root == tmp_path / "syftbox" and config.state.state_dir == tmp_path / "state"
    assert config.model.source == "random"
    assert {k: v.shape for k, v in config.model.arrays.items()} == {"w": (784, 10), "b": (10,)}
    assert out.read_text().startswith("# Starter job written by `fl-orchestrator init`")


def test_init_with_a_checkpoint_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "start.npz", w=np.zeros((2, 2), dtype=np.float32))
    (tmp_path / "jobs").mkdir()
    args = [
        "init",
        "--out",
        "jobs/job.toml",
        "--name",
        "j",
        "--aggregator",
        AGGREGATOR,
        "--datasite",
        A,
        "--syftbox-root",
        "box",
        "--state-dir",
        "state",
        "--checkpoint",
        "start.npz",
    ]
    assert tool_main(args) == 0
    config = load_config(tmp_path / "jobs" / "job.toml")
    # Relative flags mean the current folder, not the job file's folder.
    assert config.syftbox.root == tmp_path / "box" and config.state.state_dir == tmp_path / "state"
    assert config.model.source == "checkpoint" and config.model.checkpoint_path == tmp_path / "start.npz"
    assert config.job.min_available_nodes == 1 and config.job.min_train_nodes == 1


def test_init_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "job.toml"
    out.write_text("precious")
    assert tool_main(init_args(out, "--array", "w=3")) == 73
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == "precious"
    assert tool_main(init_args(out, "--array", "w=3", "--force")) == 0
    assert tomllib.loads(out.read_text())["job"]["name"] == "mnist-cnn"


W = ("--array", "w=3")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            [*W, "--aggregator", "not-an-email"],
            "config error: syftbox.aggregator_email = 'not-an-email': expected an email address",
        ),
        (
            [*W, "--datasite", "bad@"],
            "config error: syftbox.datasites[3] = 'bad@': expected an email address",
        ),
        ([*W, "--num-rounds", "0"], "config error: job.num_rounds = 0: expected a value >= 1"),
        ([*W, "--num-rounds", "many"], "config error: job.num_rounds = 'many': expected an integer"),
        ([*W, "--name", "no spaces"], "config error: job.name = 'no spaces'"),
        (["--array", "w=3,x"], "config error: model.arrays.w.shape[1] = 'x': expected an integer"),
        ([], "config error: model.arrays = {}: expected at least one array"),
    ],
)
def test_init_validates_like_the_daemon_and_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = tmp_path / "job.toml"
    assert tool_main(init_args(out, *extra)) == EX_CONFIG
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not out.exists()


def test_init_with_a_malformed_array_flag_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        tool_main(init_args(tmp_path / "job.toml", "--array", "w"))
    assert exited.value.code == 64


def test_init_without_its_flags_names_the_missing_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert tool_main(["init", "--name", "x"]) == 64
    err = capsys.readouterr().err
    assert err.startswith("fl-orchestrator init: error: missing --out, --aggregator, --datasite")


def test_init_from_a_syft_flwr_project_outside_its_environment_says_where_to_run_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "proj"
    (project / "app").mkdir(parents=True)
    (project / "app" / "__init__.py").write_text("")
    (project / "app" / "server.py").write_text("import no_such_package_here\n")
    (project / "pyproject.toml").write_text(
        '[project]\nname = "proj"\n[tool.flwr.app.components]\nserverapp = "app.server:app"\n'
        '[tool.syft_flwr]\napp_name = "a"\naggregator = "agg@x.org"\ndatasites = ["d@x.org"]\n'
    )
    assert tool_main(["init", "--from-syft-flwr", str(project)]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "importing app.server failed (ModuleNotFoundError" in err and "project's environment" in err
    assert not (project / "fl-orchestrator.toml").exists()


def test_export_never_overwrites_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fl_orchestrator.storage.models import ModelStore

    job = write_job(tmp_path, job_table(3))
    config = load_config(job)
    ModelStore(config.state.state_dir, config.job.name).save(1, {"w": np.ones(3, np.float32)})
    out = tmp_path / "model.npz"
    out.write_bytes(b"the user's own file")
    assert tool_main(["export", "--config", str(job), "--out", str(out)]) == 73
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"the user's own file"
    assert tool_main(["export", "--config", str(job), "--out", str(out), "--force"]) == 0
    with np.load(out) as saved:
        np.testing.assert_array_equal(saved["w"], np.ones(3, np.float32))


def test_a_missing_syftbox_root_is_an_error_unless_create(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "fl_orchestrator.cli.tool_main", "datasite", "--syftbox-root"]
    command += [str(tmp_path / "SyftBx"), "--email", "a@x.org", "--aggregator", "b@x.org", "--job", "j"]
    command += ["--train", "fl_orchestrator.demo.digits:train"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 66
    assert f"--syftbox-root {tmp_path / 'SyftBx'} does not exist" in done.stderr and "--create" in done.stderr
    assert not (tmp_path / "SyftBx").exists()  # a typo is not silently made into a folder


@pytest.mark.integration  # a real daemon: in make test, not make test-fast
def test_a_relative_syftbox_root_is_made_absolute_at_start(tmp_path: Path) -> None:
    # Relative, the watcher's paths and the runner's disagreed: only the rescan ever saw a task.
    (tmp_path / "box").mkdir()
    command = [sys.executable, "-m", "fl_orchestrator.cli.tool_main", "datasite", "--syftbox-root", "box"]
    command += ["--email", "a@x.org", "--aggregator", "b@x.org", "--job", "j"]
    command += ["--train", "fl_orchestrator.demo.digits:train"]
    command += ["--log-format", "json"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        started = json.loads(process.stdout.readline())
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert started["event"] == "datasite.started"
    assert started["tasks_dir"].startswith(str(tmp_path.resolve() / "box") + "/")


def test_a_datasite_runs_a_train_function_or_a_client_app_never_both(tmp_path: Path) -> None:
    base = ["datasite", "--syftbox-root", str(tmp_path), "--email", "a@x.org", "--aggregator", "b@x.org"]
    base += ["--job", "j"]
    for extra in ([], ["--train", "m:f", "--client-app", "m:app"]):
        with pytest.raises(SystemExit) as exited:
            tool_main([*base, *extra])
        assert exited.value.code == 64


def test_node_config_comes_from_the_data_owners_file_then_its_flags(tmp_path: Path) -> None:
    from fl_orchestrator.cli.datasite_cmd import node_config_of as _node_config
    from fl_orchestrator.cli.datasite_cmd import node_setting as _node_setting

    settings = tmp_path / "node.toml"
    settings.write_text('partition-id = 1\ndata-path = "/srv/a"\nfull = true\n')
    flags = [_node_setting("partition-id=3"), _node_setting("label=left hand")]
    assert _node_config(settings, flags) == {
        "partition-id": 3,
        "data-path": "/srv/a",
        "full": True,
        "label": "left hand",
    }
    settings.write_text("nested = { a = 1 }\n")
    with pytest.raises(ValueError, match="must be a string, number or boolean"):
        _node_config(settings, [])


# ---- against a real run -------------------------------------------------------------------


def site_runner(
    config_path: Path,
    index: int,
    *,
    fail_rounds: tuple[int, ...] = (),
    slow_until: threading.Event | None = None,
    slow_rounds: tuple[int, ...] = (),
) -> DatasiteRunner:
    config = load_config(config_path)

    def train(arrays: dict[str, np.ndarray], train_config: dict[str, Any]) -> Any:
        rnd = train_config["server-round"]
        if rnd in fail_rounds:
            raise ValueError(f"no data for round {rnd}")
        if rnd in slow_rounds and slow_until is not None:
            slow_until.wait(10)  # a straggler until the test lets it go, long after the timeout
        return scripted.scripted_update(arrays, index), scripted.num_examples_of(index), {"loss": 1.0 / rnd}

    settings = RunnerSettings(
        root=config.syftbox.root,
        email=config.syftbox.datasites[index],
        aggregator=config.syftbox.aggregator_email,
        job=config.job.name,
        train="unused:unused",
        heartbeat_interval_seconds=0.2,
        rescan_interval_seconds=0.5,
    )
    return DatasiteRunner(settings, train=train)


@pytest.mark.integration  # a real daemon: in make test, not make test-fast
def test_status_report_and_init_on_a_real_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job.toml"
    # The job itself comes from `init`: what it writes must be a job the daemon runs.
    extra = ["--num-rounds", "2", "--round-timeout-seconds", "0.8", "--array", "w=4,3", "--array", "b=3"]
    assert tool_main(init_args(job, *extra)) == 0
    config = load_config(job)
    state_dir = config.state.state_dir
    # A file the start-up scan refuses, so the quarantine counts have something to carry.
    results = JobLayout(config.syftbox.root, config.job.name, AGGREGATOR).results_dir(C)
    results.mkdir(parents=True)
    (results / "0123abcd.result").write_bytes(b"\x00not a result")
    daemon = Daemon(config, handle_signals=False)
    straggling = threading.Event()
    seen_mid_run: list[tuple[dict[str, Any], str]] = []

    async def watch_status() -> None:
        # Catch the daemon in a training phase, as an operator would.
        while True:
            code, text = show_status(state_dir, as_json=True)
            if code == 0 and json.loads(text)["phase"] == "training":
                seen_mid_run.append((json.loads(text), show_status(state_dir, as_json=False)[1]))
                return
            await anyio.sleep(0.01)

    async def run() -> None:
        with anyio.fail_after(15):
            async with anyio.create_task_group() as group:
                group.start_soon(watch_status)
                group.start_soon(site_runner(job, 0).run)
                group.start_soon(site_runner(job, 1).run)
                # C fails round 1 and is too slow for round 2.
                slow = site_runner(job, 2, fail_rounds=(1,), slow_until=straggling, slow_rounds=(2,))
                group.start_soon(slow.run)
                await daemon.run()
                straggling.set()  # a train thread cannot be cancelled, only released
                group.cancel_scope.cancel()

    anyio.run(run)
    assert daemon.exit_code == EXIT_DONE

    ((mid, mid_text),) = seen_mid_run
    assert mid["state"] == "running" and mid["daemon"] == "alive" and mid["attempt"] == 1
    assert mid["selected"] == [A, B, C] and mid["seconds_left"] is not None
    assert mid_text.startswith("job mnist-cnn (run ") and mid_text.splitlines()[0].endswith(": running")
    assert "time left in round:" in mid_text

    capsys.readouterr()
    assert tool_main(["status", "--config", str(job)]) == 0
    text = capsys.readouterr().out
    assert "round 2 of 2, phase done" in text and ": done" in text.splitlines()[0]
    assert tool_main(["status", "--config", str(job), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["state"] == "done" and doc["round"] == 2 and doc["num_rounds"] == 2
    sites = doc["datasites"]
    assert sites[A]["succeeded"] == 2 and sites[A]["mean_train_seconds"] is not None
    assert (sites[C]["failed"], sites[C]["timed_out"], sites[C]["succeeded"]) == (1, 1, 0)
    assert sites[C]["mean_train_seconds"] is None
    assert all(s["last_seen_seconds_ago"] is not None for s in sites.values())
    assert sites[C]["quarantined"] == {"malformed": 1}

    if HAS_MATPLOTLIB:
        out = tmp_path / "report.png"
        assert tool_main(["report", "--config", str(job), "--out", str(out)]) == 0
        assert out.read_bytes().startswith(PNG_MAGIC)
