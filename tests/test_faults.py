"""Faults an operator's VM has on a bad day, against the installed daemon as a process.

Each test asserts the exit code, the events, and the final model against the
hand-computed undisturbed run. Write faults are injected through the state
layer's fault file (storage/failpoints.py), and once through a real, small,
full tmpfs where the machine lets the test mount one.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fl_orchestrator.config import load_config
from fl_orchestrator.simulate.federation import DatasiteSpec, LocalFederation
from fl_orchestrator.storage.checkpoints import CheckpointStore
from fl_orchestrator.storage.failpoints import ENV as FAILPOINTS_ENV
from fl_orchestrator.storage.failpoints import FAULT_FILE_ENV
from fl_orchestrator.storage.models import ModelStore, initial_model
from fl_orchestrator.storage.round_log import DispatchRecord, read_records
from fl_orchestrator.wire.layout import JobLayout

from support import scripted
from support.daemon_process import (
    TESTS_DIR,
    TOOL,
    DaemonProcess,
    assert_same_model,
    expected_model,
    run_to_end,
)
from support.jobs import job_table, site_emails, write_job

pytestmark = pytest.mark.slow
SITES = [0, 1, 2]


def _job(folder: Path, rounds: int = 3, **sections: dict[str, object]) -> Path:
    job = {"num_rounds": rounds, "min_train_nodes": 3, "round_timeout_seconds": 30.0}
    job.update(sections.pop("job", {}))
    state = {"state_dir": "state", "write_retry_seconds": 20.0}
    state.update(sections.pop("state", {}))
    return write_job(folder, job_table(3, job=job, state=state, **sections))


@pytest.fixture
def federation_for() -> Iterator[object]:
    started: list[LocalFederation] = []

    def start(job: Path, delay_seconds: float = 0.0) -> LocalFederation:
        federation = LocalFederation(job, job.parent / "logs", extra_pythonpath=[TESTS_DIR])
        federation.start_datasites(
            [
                DatasiteSpec(
                    email,
                    "support.scripted:train",
                    {scripted.ENV_INDEX: str(i), scripted.ENV_DELAY: str(delay_seconds)},
                    # These owners outlive a job: the tests restart and rerun it under them.
                    ("--train", "support.scripted:train", "--keep-running"),
                )
                for i, email in enumerate(site_emails(3))
            ],
            heartbeat_interval_seconds=0.2,
        )
        started.append(federation)
        return federation

    yield start
    for federation in started:
        federation.stop()


def _final_model_matches(job: Path, rounds: int = 3) -> None:
    config = load_config(job)
    store = ModelStore(config.state.state_dir, config.job.name)
    assert store.rounds()[-1] == rounds
    assert_same_model(store.load(rounds), expected_model(config, rounds, SITES))


def _run_status(job: Path) -> str:
    config = load_config(job)
    return str(json.loads((config.state.state_dir / "run.json").read_text())["status"])


# ---- transient and persistent write faults --------------------------------------------------


@pytest.mark.parametrize("code", ["ENOSPC", "EIO"])
def test_a_write_fault_of_three_seconds_mid_collection_is_survived(
    tmp_path: Path, federation_for: object, code: str
) -> None:
    job = _job(tmp_path)
    fault = tmp_path / "fault"
    federation_for(job, delay_seconds=0.3)  # type: ignore[operator]
    daemon = DaemonProcess(job, env={FAULT_FILE_ENV: str(fault)})
    try:
        daemon.wait_for("round.dispatched", lambda e: e["round"] == 2)
        fault.write_text(code)
        # Hold the fault until the daemon has been failing for 3 s, by its own account.
        daemon.wait_for("state.write_failed", lambda e: e["gives_up_in_seconds"] <= 17.0, timeout=30)
        fault.unlink()
        assert daemon.wait(timeout=60) == 0, daemon.output()
    finally:
        daemon.kill()
    failed = daemon.events("state.write_failed")
    assert failed and {e["errno"] for e in failed} == {code}
    assert daemon.events("state.write_recovered")
    assert not daemon.events("state.write_gave_up")
    assert [e["round"] for e in daemon.events("round.completed")] == [1, 2, 3]
    # job and run are bound once for the whole run (structlog contextvars), never passed by hand.
    run_id = json.loads((load_config(job).state.state_dir / "run.json").read_text())["run_id"]
    assert {(e["job"], e["run"]) for e in daemon.events("state.write_failed")} == {("testjob", run_id)}
    assert _run_status(job) == "done"
    _final_model_matches(job)


def test_a_write_fault_that_stays_exits_74_after_the_retry_time_and_a_restart_resumes(
    tmp_path: Path, federation_for: object
) -> None:
    job = _job(tmp_path, state={"write_retry_seconds": 2.0})
    fault = tmp_path / "fault"
    federation_for(job, delay_seconds=0.3)  # type: ignore[operator]
    daemon = DaemonProcess(job, env={FAULT_FILE_ENV: str(fault)})
    try:
        daemon.wait_for("round.dispatched", lambda e: e["round"] == 2)
        fault.write_text("ENOSPC")
        assert daemon.wait(timeout=60) == 74, daemon.output()
    finally:
        daemon.kill()
    failed = daemon.events("state.write_failed")
    (gave_up,) = daemon.events("state.write_gave_up")
    assert gave_up["errno"] == "ENOSPC" and gave_up["path"]
    assert gave_up["retried_seconds"] >= 2.0
    assert failed[0]["path"] == gave_up["path"]
    assert "Traceback" not in daemon.output()
    assert _run_status(job) == "running"  # never terminal: storage is not the job's fault

    fault.unlink()
    restarted = run_to_end(job)
    assert restarted.events("job.resumed")
    _final_model_matches(job)


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    return done.returncode == 0


def test_a_real_full_disk_under_the_state_folder_is_survived(tmp_path: Path, federation_for: object) -> None:
    state_dir = tmp_path / "state"
    if not _mount_tmpfs(state_dir, "8m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected faults cover the same paths")
    try:
        job = _job(tmp_path)
        federation_for(job, delay_seconds=0.3)  # type: ignore[operator]
        daemon = DaemonProcess(job)
        try:
            daemon.wait_for("round.dispatched", lambda e: e["round"] == 2)
            filler = state_dir / "filler"
            with open(filler, "wb") as handle:
                try:
                    while True:
                        handle.write(b"\0" * (1 << 16))
                        handle.flush()
                except OSError:
                    pass
            daemon.wait_for("state.write_failed", lambda e: e["gives_up_in_seconds"] <= 17.0, timeout=40)
            filler.unlink()
            assert daemon.wait(timeout=60) == 0, daemon.output()
        finally:
            daemon.kill()
        assert {e["errno"] for e in daemon.events("state.write_failed")} == {"ENOSPC"}
        assert daemon.events("state.write_recovered")
        _final_model_matches(job)
    finally:
        subprocess.run(["umount", "-l", str(state_dir)], check=False)


NOBODY = 65534


def test_a_read_only_state_folder_mid_round_is_survived_as_a_non_root_user(federation_for: object) -> None:
    user = NOBODY if os.geteuid() == 0 else None
    # A folder the unprivileged daemon can reach (pytest's tmp_path is private to its user).
    folder = Path(tempfile.mkdtemp(prefix="fl-faults-"))
    os.chmod(folder, 0o777)
    try:
        job = _job(folder)
        # The daemon first, so that it, not a root-owned runner, creates the folders it writes.
        daemon = DaemonProcess(job, user=user)
        state_dir = folder / "state"
        try:
            try:
                daemon.wait_for("job.started", timeout=30)
            except AssertionError as exc:
                if user is not None and "ermission denied" in daemon.output():
                    pytest.skip(f"the unprivileged user cannot run the installed daemon here: {exc}")
                raise
            federation_for(job, delay_seconds=0.3)  # type: ignore[operator]
            daemon.wait_for("round.dispatched", lambda e: e["round"] == 2)
            _chmod_tree(state_dir, writable=False)
            daemon.wait_for("state.write_failed", lambda e: e["gives_up_in_seconds"] <= 17.0, timeout=40)
            _chmod_tree(state_dir, writable=True)
            assert daemon.wait(timeout=60) == 0, daemon.output()
        finally:
            _chmod_tree(state_dir, writable=True)
            daemon.kill()
        assert {e["errno"] for e in daemon.events("state.write_failed")} == {"EACCES"}
        _final_model_matches(job)
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)


def _chmod_tree(root: Path, *, writable: bool) -> None:
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode):
                os.chmod(path, (mode | 0o222) if writable else (mode & ~0o222))
    mode = root.stat().st_mode
    os.chmod(root, (mode | 0o222) if writable else (mode & ~0o222))


# ---- start-up ------------------------------------------------------------------------------


def _start_only(job: Path, failpoints: str) -> tuple[int, str]:
    """Start the daemon with crash points armed; return its exit code and the point that fired."""
    daemon = DaemonProcess(job, env={FAILPOINTS_ENV: failpoints})
    try:
        code = daemon.wait(timeout=60)
    finally:
        daemon.kill()
    fired = [line.split()[1] for line in daemon.output().splitlines() if line.startswith("failpoint ")]
    return code, fired[-1] if fired else ""


def test_a_kill_9_at_every_write_of_the_first_start_leaves_a_startable_folder(
    tmp_path: Path, federation_for: object
) -> None:
    crashes = 0
    for point in ("write.before_rename", "write.after_rename", "round_log.before_append"):
        count = 0
        while True:
            count += 1
            job = _job(tmp_path / f"{point}-{count}")
            code, fired = _start_only(job, f"{point}:{count},start.done:1")
            assert code == -signal.SIGKILL, fired
            if fired == "start.done":
                break  # the first start writes fewer than `count` files through this point
            assert fired == point
            crashes += 1
            # The restart must get through start-up from whatever the crash left.
            code, fired = _start_only(job, "start.done:1")
            assert (code, fired) == (-signal.SIGKILL, "start.done"), (point, count)
            config = load_config(job)
            store = ModelStore(config.state.state_dir, config.job.name)
            assert_same_model(store.load(0), initial_model(config.model))
            assert CheckpointStore(config.state.state_dir, config.job.name, 3).load(0).round == 0
            assert not list(config.state.state_dir.rglob("*.tmp")), "a leftover temp file survived"
    print(f"\nfirst start: {crashes} write points crashed, each restarted cleanly")
    assert crashes >= 6  # run.json, config, permissions, model, checkpoint: each a write point
    # And one of those folders runs to the end with the undisturbed model.
    federation_for(job)  # type: ignore[operator]
    run_to_end(job)
    _final_model_matches(job)


def test_our_leftover_temp_files_never_wedge_a_start(tmp_path: Path, federation_for: object) -> None:
    job = _job(tmp_path, rounds=1)
    config = load_config(job)
    state_dir = config.state.state_dir
    state_dir.mkdir(parents=True)
    (state_dir / ".run.json.0123456789ab.tmp").write_text("{")
    tasks = JobLayout(config.syftbox.root, config.job.name, config.syftbox.aggregator_email).aggregator_dir
    tasks.mkdir(parents=True)
    (tasks / ".global-r00001.msgpack.fedcba987654.tmp").write_bytes(b"half a model")
    (state_dir / "notes.txt").write_text("not ours")  # ... but this is someone's file
    refused = run_to_end(job, expect=78)
    assert "holds files but no run.json" in refused.output()
    (state_dir / "notes.txt").unlink()

    federation_for(job)  # type: ignore[operator]
    daemon = run_to_end(job)
    removed = {
        Path(e["path"]).name
        for process in (refused, daemon)
        for name in ("state.leftover_removed", "syftbox.leftover_removed")
        for e in process.events(name)
    }
    assert {".run.json.0123456789ab.tmp", ".global-r00001.msgpack.fedcba987654.tmp"} <= removed
    assert not list(tasks.rglob("*.tmp"))
    _final_model_matches(job, rounds=1)
    run_to_end(job, args=["--rerun"])


def test_a_second_daemon_on_the_same_state_folder_exits_75_naming_the_first(
    tmp_path: Path, federation_for: object
) -> None:
    job = _job(tmp_path, rounds=2, job={"available_timeout_seconds": 60.0})
    first = DaemonProcess(job)
    try:
        first.wait_for("job.started")
        second = DaemonProcess(job)
        assert second.wait(timeout=30) == 75
        assert f"locked by pid {first.pid}" in second.output()
        assert first.process.poll() is None
        # The tools read the state folder while the daemon holds it.
        status = subprocess.run(
            [str(TOOL), "status", "--config", str(job)], capture_output=True, text=True, check=False
        )
        assert status.returncode == 0, status.stderr
        export = subprocess.run(
            [str(TOOL), "export", "--config", str(job), "--round", "0", "--out", str(tmp_path / "r0.npz")],
            capture_output=True,
            text=True,
            check=False,
        )
        assert export.returncode == 0, export.stderr
        federation_for(job)  # type: ignore[operator]
        assert first.wait(timeout=60) == 0, first.output()
    finally:
        first.kill()
    _final_model_matches(job, rounds=2)
    # The lock went with the process: the next start is not refused.
    again = run_to_end(job)
    assert again.events("job.already_complete")


# ---- counted results that vanish or change --------------------------------------------------


def _counted_in_round(job: Path, rnd: int) -> list[Path]:
    config = load_config(job)
    log = config.state.state_dir / "rounds" / f"r{rnd:05d}.log"
    return [Path(r.path) for r in read_records(log) if getattr(r, "ok", False)]


def test_a_counted_result_deleted_before_a_restart_is_folded_from_the_kept_link(
    tmp_path: Path, federation_for: object
) -> None:
    job = _job(tmp_path)
    federation_for(job)  # type: ignore[operator]
    run_to_end(job, expect=-signal.SIGKILL, env={FAILPOINTS_ENV: "fold.after:4"})  # round 2's first fold
    (counted,) = _counted_in_round(job, 2)
    counted.unlink()  # the datasite cleans its outbox
    restarted = run_to_end(job)
    assert not restarted.events("result.recollect")
    assert [e["round"] for e in restarted.events("round.completed")] == [2, 3]
    _final_model_matches(job)


def test_a_counted_result_rewritten_in_place_is_refused_and_collected_again(
    tmp_path: Path, federation_for: object
) -> None:
    job = _job(tmp_path, job={"round_timeout_seconds": 3.0, "max_round_retries": 1})
    federation_for(job)  # type: ignore[operator]
    run_to_end(job, expect=-signal.SIGKILL, env={FAILPOINTS_ENV: "fold.after:4"})
    (counted,) = _counted_in_round(job, 2)
    before = counted.stat()
    data = bytearray(counted.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last float becomes +inf: same size, other bytes
    with open(counted, "r+b") as handle:
        handle.write(data)
    os.utime(counted, ns=(before.st_atime_ns, before.st_mtime_ns))
    restarted = run_to_end(job)
    (recollect,) = restarted.events("result.recollect")
    assert "changed_after_count" in recollect["detail"]
    # Its runner had already answered that task: the attempt timed out and was retried.
    (retried,) = restarted.events("round.attempt_failed")
    assert retried["round"] == 2 and retried["retry"] is True
    _final_model_matches(job)


# ---- clocks and presence -------------------------------------------------------------------


def test_a_heartbeat_older_than_the_round_never_makes_a_deadline_in_the_past(
    tmp_path: Path, federation_for: object
) -> None:
    from fl_orchestrator.wire.messages import Envelope, HeartbeatMessage, encode_heartbeat

    job = _job(
        tmp_path, rounds=2, job={"round_timeout_seconds": 20.0}, syftbox={"presence_ttl_seconds": 120.0}
    )
    config = load_config(job)
    layout = JobLayout(config.syftbox.root, config.job.name, config.syftbox.aggregator_email)
    old = time.time() - 60  # written before this daemon started, still within the presence TTL
    for email in site_emails(3):
        path = layout.heartbeat_path(email)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(
            encode_heartbeat(HeartbeatMessage(Envelope(config.job.name, 0, "b1", None, old, None), "idle"))
        )
        os.utime(path, (old, old))
    daemon = DaemonProcess(job)
    try:
        dispatched = daemon.wait_for("round.dispatched", lambda e: e["round"] == 1)
        assert dispatched["deadline_in_seconds"] > 15.0
        federation_for(job)  # type: ignore[operator]
        assert daemon.wait(timeout=60) == 0, daemon.output()
    finally:
        daemon.kill()
    assert not daemon.events("job.failed")
    _final_model_matches(job, rounds=2)


@pytest.mark.parametrize("after_seconds", [0.0, 0.05, 0.1, 0.2])
def test_sigterm_at_any_instant_of_start_up_stops_cleanly_within_5_seconds(
    tmp_path: Path, federation_for: object, after_seconds: float
) -> None:
    job = _job(tmp_path, rounds=1, job={"available_timeout_seconds": 60.0})
    state_dir = load_config(job).state.state_dir
    daemon = DaemonProcess(job)
    time.sleep(after_seconds)
    sent = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    code = daemon.wait(timeout=10)
    assert time.monotonic() - sent < 5.0
    if code == -signal.SIGTERM:
        # Only possible before the interpreter ran our first line (cli/daemon_entry.py):
        # then no code of ours has run, and nothing was written.
        assert daemon.output() == "" and not state_dir.exists(), daemon.output()
    else:
        assert code == 0, daemon.output()
        assert "Traceback" not in daemon.output()
    federation_for(job)  # type: ignore[operator]
    run_to_end(job)
    _final_model_matches(job, rounds=1)


# ---- checkpoints and JSON lines ------------------------------------------------------------


def test_a_checkpoint_fallback_enters_the_round_already_out_instead_of_dispatching_it_again(
    tmp_path: Path, federation_for: object
) -> None:
    job = _job(tmp_path, rounds=4)
    config = load_config(job)
    federation_for(job, delay_seconds=0.2)  # type: ignore[operator]
    run_to_end(job, expect=-signal.SIGKILL, env={FAILPOINTS_ENV: "dispatch.after_tasks:3"})  # round 3 is out
    checkpoint = CheckpointStore(config.state.state_dir, config.job.name, 3).path_for(2)
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    metrics = config.state.state_dir / "metrics.jsonl"
    with open(metrics, "ab") as handle:
        handle.write(b'{"round": 3, "attem')  # a kill -9 mid-append
    restarted = run_to_end(job)
    assert restarted.events("checkpoint.corrupt")
    assert restarted.events("round.replayed_past_checkpoint")
    assert restarted.events("jsonl.torn_tail_cut")
    dispatches = [
        r
        for r in read_records(config.state.state_dir / "rounds" / "r00003.log")
        if isinstance(r, DispatchRecord)
    ]
    assert len(dispatches) == 1, dispatches
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2, 3, 4]
    _final_model_matches(job, rounds=4)
