"""Checkpoints, round logs, run records and failing writes."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import anyio
import numpy as np
import pytest

from fl_orchestrator.config import load_config
from fl_orchestrator.daemon.lifecycle import EXIT_DONE, Daemon
from fl_orchestrator.storage.checkpoints import MAGIC, Checkpoint, CheckpointError, CheckpointStore
from fl_orchestrator.storage.job_state import JobState, StartRefused, StateWriteError
from fl_orchestrator.storage.models import ModelStore
from fl_orchestrator.storage.round_log import CloseRecord, DispatchRecord, ResultRecord, RoundLog
from fl_orchestrator.storage.run_record import load_run

from support.jobs import job_table, write_job


def checkpoint(rnd: int, value: float = 1.0) -> Checkpoint:
    return Checkpoint(
        round=rnd,
        run_id="run1",
        model={"w": np.full((3, 2), value, dtype=np.float32), "b": np.arange(2, dtype=np.float64)},
        strategy_state={"m": {"w": np.ones((3, 2))}, "step": rnd, "rng": {"state": 2**70, "name": "PCG64"}},
        records={"a@x.org": {"succeeded": rnd, "failed": 0}},
    )


def test_checkpoint_round_trips_model_strategy_state_and_records(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "job", keep=3)
    store.save(checkpoint(4, 2.5))
    loaded = store.load(4)
    assert loaded.round == 4 and loaded.run_id == "run1"
    assert np.array_equal(loaded.model["w"], np.full((3, 2), 2.5, dtype=np.float32))
    assert loaded.model["b"].dtype == np.float64
    assert np.array_equal(loaded.strategy_state["m"]["w"], np.ones((3, 2)))
    assert loaded.strategy_state["step"] == 4 and loaded.strategy_state["rng"]["state"] == 2**70
    assert loaded.records == {"a@x.org": {"succeeded": 4, "failed": 0}}


def test_a_checkpoint_names_the_saved_model_instead_of_copying_it(tmp_path: Path) -> None:
    # The round's model file is written first (the daemon's order): the checkpoint holds its hash.
    big = checkpoint(2, 1.5)
    big = Checkpoint(2, "run1", {"w": np.full((500, 200), 1.5, np.float32)}, big.strategy_state, big.records)
    models = ModelStore(tmp_path, "job")
    models.save(2, big.model)
    store = CheckpointStore(tmp_path, "job", keep=3)
    path = store.save(big)
    assert path.stat().st_size < 10_000 < models.path_for(2).stat().st_size  # 400 kB not copied
    assert np.array_equal(store.load(2).model["w"], big.model["w"])
    # Without its model file (or with another model in it) a checkpoint carries the model itself.
    embedded = store.save(checkpoint(3, 4.0))
    assert embedded.stat().st_size > 48 and np.array_equal(
        store.load(3).model["w"], checkpoint(3, 4.0).model["w"]
    )


def test_a_checkpoint_whose_model_file_changed_is_unusable_and_the_previous_is_used(tmp_path: Path) -> None:
    models = ModelStore(tmp_path, "job")
    store = CheckpointStore(tmp_path, "job", keep=3)
    for rnd in (1, 2):
        models.save(rnd, checkpoint(rnd, float(rnd)).model)
        store.save(checkpoint(rnd, float(rnd)))
    models.save(2, checkpoint(2, 99.0).model)  # rewritten behind the checkpoint's back
    with pytest.raises(CheckpointError, match="the model it names is unusable"):
        store.load(2)
    models.path_for(1).unlink()
    with pytest.raises(CheckpointError, match="unusable"):
        store.load(1)
    assert store.load_latest() is None  # neither can be trusted: the start refuses (tested below)


def test_only_the_newest_k_checkpoints_are_kept(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "job", keep=2)
    for rnd in range(5):
        store.save(checkpoint(rnd))
    assert store.rounds() == [3, 4]


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "bad_magic", "empty"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path: Path, damage: str) -> None:
    store = CheckpointStore(tmp_path, "job", keep=3)
    store.save(checkpoint(1, 1.0))
    store.save(checkpoint(2, 2.0))
    path = store.path_for(2)
    data = bytearray(path.read_bytes())
    if damage == "flip_byte":
        data[-3] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "bad_magic":
        data[:8] = b"NOTCKPT\n"
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        store.load(2)
    corrupt: list[int] = []
    latest = store.load_latest(on_corrupt=lambda rnd, why: corrupt.append(rnd))
    assert latest is not None and latest.round == 1
    assert float(latest.model["w"][0, 0]) == 1.0
    assert corrupt == [2]


def test_checkpoint_of_another_job_is_refused(tmp_path: Path) -> None:
    CheckpointStore(tmp_path, "other", keep=3).save(checkpoint(1))
    with pytest.raises(CheckpointError, match="belongs to job 'other'"):
        CheckpointStore(tmp_path, "job", keep=3).load(1)
    assert (tmp_path / "checkpoints" / "ckpt-r00001.bin").read_bytes().startswith(MAGIC)


def result_record(site: str, at: float) -> ResultRecord:
    return ResultRecord(
        1, site, "t" + site[0], True, 5, {"loss": 0.5}, None, None, f"/x/{site}", (1, 2, 3), at
    )


def test_round_log_reads_back_in_order_and_ignores_a_torn_tail(tmp_path: Path) -> None:
    log = RoundLog(tmp_path, 3)
    records = [
        DispatchRecord(1, {"a@x.org": "ta"}, 10.0, 20.0),
        result_record("a@x.org", 11.0),
        CloseRecord(1, 20.0),
    ]
    for record in records:
        log.append(record)
    log.close()
    assert RoundLog(tmp_path, 3).read() == records
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write('{"crc": 1, "rec": "{\\"type\\": \\"resu')  # kill -9 mid-append
    assert RoundLog(tmp_path, 3).read() == records
    again = RoundLog(tmp_path, 3)
    again.append(result_record("b@x.org", 12.0))
    again.close()
    assert RoundLog(tmp_path, 3).read() == [*records, result_record("b@x.org", 12.0)]


def test_round_log_stops_at_a_damaged_middle_line(tmp_path: Path) -> None:
    log = RoundLog(tmp_path, 1)
    for at in (1.0, 2.0, 3.0):
        log.append(result_record("a@x.org", at))
    log.close()
    lines = log.path.read_text().splitlines()
    lines[1] = lines[1].replace("0.5", "0.7")  # payload no longer matches its CRC
    log.path.write_text("\n".join(lines) + "\n")
    assert [r.at for r in RoundLog(tmp_path, 1).read()] == [1.0]  # type: ignore[union-attr]


def test_start_fresh_then_done_is_terminal_and_rerun_archives(tmp_path: Path) -> None:
    state = JobState(tmp_path / "s", "job", keep_checkpoints=2, retry_seconds=1)
    first = state.start(rerun=False)
    assert first.checkpoint is None and not first.complete
    anyio.run(state.finish, "done")
    again = JobState(tmp_path / "s", "job", keep_checkpoints=2, retry_seconds=1).start(rerun=False)
    assert again.complete and again.run.run_id == first.run.run_id
    (tmp_path / "s" / "metrics.jsonl").write_text("earlier run's metrics\n")
    rerun = JobState(tmp_path / "s", "job", keep_checkpoints=2, retry_seconds=1).start(rerun=True)
    assert not rerun.complete and rerun.run.run_id != first.run.run_id
    archived = tmp_path / "s" / "archive" / first.run.run_id
    assert (archived / "metrics.jsonl").read_text() == "earlier run's metrics\n"
    assert json.loads((archived / "run.json").read_text())["status"] == "done"


def test_start_refuses_foreign_or_unexplained_state(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "something.bin").write_bytes(b"x")
    with pytest.raises(StartRefused, match=r"no run\.json"):
        JobState(folder, "job", keep_checkpoints=2, retry_seconds=1).start(rerun=False)
    other = tmp_path / "o"
    JobState(other, "another", keep_checkpoints=2, retry_seconds=1).start(rerun=False)
    with pytest.raises(StartRefused, match="belongs to job 'another'"):
        JobState(other, "job", keep_checkpoints=2, retry_seconds=1).start(rerun=False)


def test_start_refuses_when_every_checkpoint_is_corrupt(tmp_path: Path) -> None:
    state = JobState(tmp_path, "job", keep_checkpoints=2, retry_seconds=1)
    run = state.start(rerun=False).run
    state.checkpoints.save(Checkpoint(0, run.run_id, {"w": np.zeros(2)}, {}, {}))
    state.checkpoints.path_for(0).write_bytes(b"garbage")
    with pytest.raises(StartRefused, match="every checkpoint"):
        JobState(tmp_path, "job", keep_checkpoints=2, retry_seconds=1).start(rerun=False)


def test_failing_writes_are_retried_then_reported(tmp_path: Path) -> None:
    state = JobState(tmp_path, "job", keep_checkpoints=2, retry_seconds=2.0)
    failures = [OSError(errno.ENOSPC, "No space left on device")] * 2

    def flaky() -> str:
        if failures:
            raise failures.pop()
        return "written"

    assert anyio.run(lambda: state.durably(flaky, what="test", path=tmp_path)) == "written"

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    quick = JobState(tmp_path, "job", keep_checkpoints=2, retry_seconds=0.3)
    with pytest.raises(StateWriteError, match="No space left on device"):
        anyio.run(lambda: quick.durably(full, what="checkpoint", path=tmp_path / "ckpt"))


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path, "job", keep=3)
    store.save(checkpoint(1, 1.0))

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("fl_orchestrator.storage.atomic.os.replace", broken_replace)
    with pytest.raises(OSError, match="Read-only"):
        store.save(checkpoint(2, 2.0))
    monkeypatch.undo()
    assert store.rounds() == [1]
    assert store.load_latest() is not None
    assert not [p for p in store.directory.iterdir() if p.name.endswith(".tmp")]


def test_restarting_a_finished_job_reports_it_complete(tmp_path: Path) -> None:
    job = write_job(tmp_path, job_table(3))
    config = load_config(job)
    state = JobState(config.state.state_dir, "testjob", keep_checkpoints=2, retry_seconds=1)
    state.start(rerun=False)
    anyio.run(state.finish, "done")
    daemon = Daemon(config, handle_signals=False)
    assert anyio.run(daemon.run) == EXIT_DONE
    run = load_run(config.state.state_dir, "testjob")
    assert run is not None and run.status == "done"
    assert not (config.state.state_dir / "models").exists()


def test_restarting_a_failed_job_reports_the_failure_and_exits_1(tmp_path: Path) -> None:
    from fl_orchestrator.daemon.lifecycle import EXIT_JOB_FAILED

    job = write_job(tmp_path, job_table(3))
    config = load_config(job)
    state = JobState(config.state.state_dir, "testjob", keep_checkpoints=2, retry_seconds=1)
    state.start(rerun=False)
    anyio.run(state.finish, "failed", "round 1 attempt 1: 1 of 2 needed results")
    daemon = Daemon(config, handle_signals=False)
    assert anyio.run(daemon.run) == EXIT_JOB_FAILED
    assert daemon.failure_reason == "round 1 attempt 1: 1 of 2 needed results"
