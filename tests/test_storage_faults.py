"""The storage layer's fault handling, in process: retries, whole appends, locks, leftovers, kept links."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from fl_orchestrator.storage import failpoints
from fl_orchestrator.storage.atomic import atomic_write_text, remove_own_temps, temp_name_for
from fl_orchestrator.storage.job_state import JobState
from fl_orchestrator.storage.jsonl import append_json_line, append_whole, read_json_lines, repair_tail
from fl_orchestrator.storage.kept import KeptResults
from fl_orchestrator.storage.lock import LockHeld, StateLock
from fl_orchestrator.storage.retry import StateWriteError, WriteRetry
from fl_orchestrator.storage.round_log import DispatchRecord, RoundLog, read_records

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def test_a_retried_write_gives_up_only_after_the_retry_time_and_names_the_errno(tmp_path: Path) -> None:
    def full() -> None:
        raise ENOSPC

    started = time.monotonic()
    with capture_logs() as logs, pytest.raises(StateWriteError) as caught:
        WriteRetry(0.4).run_blocking(full, what="model", path=tmp_path / "m")
    assert time.monotonic() - started >= 0.4
    assert caught.value.errno_name == "ENOSPC"
    gave_up = [e for e in logs if e["event"] == "state.write_gave_up"]
    assert len(gave_up) == 1 and gave_up[0]["errno"] == "ENOSPC" and gave_up[0]["path"].endswith("m")


def test_a_write_that_recovers_is_reported_once_and_returns_its_value(tmp_path: Path) -> None:
    failures = [ENOSPC, ENOSPC]

    def flaky() -> str:
        if failures:
            raise failures.pop()
        return "written"

    with capture_logs() as logs:
        assert anyio.run(lambda: WriteRetry(5.0).run(flaky, what="x", path=tmp_path)) == "written"
    assert [e["event"] for e in logs] == ["state.write_failed", "state.write_failed", "state.write_recovered"]


def test_the_injected_fault_file_fails_writes_while_it_exists(tmp_path: Path) -> None:
    fault = tmp_path / "fault"
    failpoints.inject_faults(str(fault))
    try:
        atomic_write_text(tmp_path / "a.txt", "1")
        fault.write_text("EROFS")
        with pytest.raises(OSError) as caught:
            atomic_write_text(tmp_path / "a.txt", "2")
        assert caught.value.errno == errno.EROFS
        fault.unlink()
        atomic_write_text(tmp_path / "a.txt", "3")
    finally:
        failpoints.inject_faults(None)
    assert (tmp_path / "a.txt").read_text() == "3"


def test_an_append_that_fails_part_way_is_cut_back_so_a_retry_writes_one_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = RoundLog(tmp_path, 1)
    log.append(DispatchRecord(1, {"a@x.org": "t1"}, 1.0, 2.0))
    real_write = os.write
    calls = {"n": 0}

    def half_then_full(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            real_write(fd, bytes(data)[: len(data) // 2])
            raise ENOSPC
        return real_write(fd, data)

    monkeypatch.setattr("fl_orchestrator.storage.jsonl.os.write", half_then_full)
    record = DispatchRecord(2, {"a@x.org": "t2"}, 3.0, 4.0)
    anyio.run(lambda: WriteRetry(5.0).run(lambda: log.append(record), what="round log", path=log.path))
    assert [r.attempt for r in read_records(log.path)] == [1, 2]  # whole, once


def test_a_torn_json_line_is_cut_at_start_and_skipped_by_readers_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append_json_line(path, {"round": 1})
    with open(path, "ab") as handle:
        handle.write(b'{"round": 2, "tor')
    warnings: list[int] = []
    assert list(read_json_lines(path, on_torn=lambda number, _: warnings.append(number))) == [{"round": 1}]
    assert warnings == [2]
    with capture_logs() as logs:
        list(read_json_lines(path))
    assert [e["event"] for e in logs] == ["jsonl.line_skipped"]
    assert repair_tail(path) == len(b'{"round": 2, "tor')
    append_json_line(path, {"round": 2})
    assert [json.loads(x)["round"] for x in path.read_text().splitlines()] == [1, 2]


def test_append_whole_cuts_back_when_fsync_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.jsonl"
    append_whole(path, b"one\n")

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("fl_orchestrator.storage.jsonl.os.fsync", broken_fsync)
    with pytest.raises(OSError):
        append_whole(path, b"two\n")
    assert path.read_bytes() == b"one\n"


def test_only_our_own_temp_names_are_removed(tmp_path: Path) -> None:
    ours = [temp_name_for(tmp_path / "run.json"), tmp_path / "sub" / ".incoming-r00001.0123456789ab.tmp"]
    theirs = [
        tmp_path / ".notes.tmp",
        tmp_path / "run.json.0123456789ab.tmp",
        tmp_path / ".x.0123456789aX.tmp",
    ]
    for path in ours + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert sorted(remove_own_temps(tmp_path, recursive=True)) == sorted(ours)
    assert all(p.exists() for p in theirs)


def test_a_folder_holding_only_our_leftovers_and_the_lock_starts_fresh(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / ".run.json.0123456789ab.tmp").write_text("{")
    lock = StateLock(state_dir)
    lock.acquire()
    try:
        start = JobState(state_dir, "job", keep_checkpoints=2, retry_seconds=1).start(rerun=False)
    finally:
        lock.release()
    assert start.checkpoint is None and not start.complete
    assert not (state_dir / ".run.json.0123456789ab.tmp").exists()


def test_the_state_lock_is_exclusive_names_its_holder_and_survives_rerun_archiving(tmp_path: Path) -> None:
    first, second = StateLock(tmp_path), StateLock(tmp_path)
    first.acquire()
    with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
        second.acquire()
    state = JobState(tmp_path, "job", keep_checkpoints=2, retry_seconds=1)
    state.start(rerun=False)
    state.start(rerun=True)  # archives the earlier run: the lock file stays where it is
    assert (tmp_path / "daemon.lock").exists()
    first.release()
    second.acquire()
    second.release()


def test_a_kept_link_outlives_the_datasite_deleting_its_file(tmp_path: Path) -> None:
    datasites = tmp_path / "datasites"
    result = datasites / "a@x.org" / "results" / "t1.result"
    result.parent.mkdir(parents=True)
    result.write_bytes(b"validated bytes")
    (result.parent / "t1.result.part-0000").write_bytes(b"part")
    kept = KeptResults(tmp_path / "state", datasites)
    assert kept.keep(3, result, result.stat().st_ino)
    assert kept.keep(3, result, result.stat().st_ino)  # again, as a restart does: unchanged
    result.unlink()
    assert kept.path_for(3, result).read_bytes() == b"validated bytes"
    assert kept.path_for(3, result).with_name("t1.result.part-0000").read_bytes() == b"part"
    kept.prune(3)
    assert not kept.root(3).exists()


def test_a_kept_link_is_refused_for_a_file_replaced_since_validation(tmp_path: Path) -> None:
    datasites = tmp_path / "datasites"
    result = datasites / "a@x.org" / "t1.result"
    result.parent.mkdir(parents=True)
    result.write_bytes(b"validated")
    validated_inode = result.stat().st_ino
    replacement = result.with_name("other")
    replacement.write_bytes(b"swapped in")
    os.replace(replacement, result)
    kept = KeptResults(tmp_path / "state", datasites)
    assert not kept.keep(1, result, validated_inode)
    assert not kept.path_for(1, result).exists()


def test_without_links_nothing_is_kept_and_it_is_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasites = tmp_path / "datasites"
    result = datasites / "a@x.org" / "t1.result"
    result.parent.mkdir(parents=True)
    result.write_bytes(b"x")

    def cross_device(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr("fl_orchestrator.storage.kept.os.link", cross_device)
    kept = KeptResults(tmp_path / "state", datasites)
    with capture_logs() as logs:
        assert not kept.keep(1, result, result.stat().st_ino)
        assert not kept.keep(2, result, result.stat().st_ino)
    assert [e["event"] for e in logs] == ["result.keep_unavailable"]


def test_pruning_drops_only_the_rounds_up_to_the_one_given(tmp_path: Path) -> None:
    kept = KeptResults(tmp_path / "state", tmp_path / "datasites")
    for rnd in (1, 2, 3, 4):
        kept.root(rnd).mkdir(parents=True)
    kept.prune(2)
    assert sorted(p.name for p in (tmp_path / "state" / "kept").iterdir()) == ["r00003", "r00004"]
