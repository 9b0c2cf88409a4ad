"""A hostile datasite against the installed daemon: junk cannot fill the disk, and the job ends."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections import Counter
from pathlib import Path

import pytest

from fl_orchestrator.config import load_config
from fl_orchestrator.config.schema import JobConfig
from fl_orchestrator.simulate.federation import DatasiteSpec, LocalFederation
from fl_orchestrator.storage.models import ModelStore, initial_model
from fl_orchestrator.wire.layout import JobLayout

from support import scripted
from support.daemon_process import TESTS_DIR, DaemonProcess, assert_same_model, expected_model
from support.jobs import job_table, site_emails, write_job
from support.records import records_under

pytestmark = pytest.mark.slow
JUNK_FILES = 20
JUNK_BYTES = 2 * 1024**2  # over the tiny test model's result limit, and over a quarantine share


def _honest_specs(count: int = 3) -> list[DatasiteSpec]:
    """The scripted honest datasites ds0..ds<count-1>."""
    return [
        DatasiteSpec(email, "support.scripted:train", {scripted.ENV_INDEX: str(i)})
        for i, email in enumerate(site_emails(count))
    ]


def _drop_junk(config: JobConfig, datasite: str, count: int, size: int) -> None:
    """``count`` files of random bytes named like results, in the datasite's results/."""
    layout = JobLayout(config.syftbox.root, config.job.name, config.syftbox.aggregator_email)
    results = layout.results_dir(datasite)
    results.mkdir(parents=True)
    for _ in range(count):
        (results / f"{secrets.token_hex(16)}.result").write_bytes(os.urandom(size))


def _run_to_the_end(tmp_path: Path, job: Path, specs: list[DatasiteSpec], timeout: float) -> DaemonProcess:
    """The datasites and the installed daemon as processes; the daemon must exit 0."""
    federation = LocalFederation(job, tmp_path / "logs", extra_pythonpath=[TESTS_DIR])
    federation.start_datasites(specs, heartbeat_interval_seconds=0.2)
    daemon = DaemonProcess(job)
    try:
        assert daemon.wait(timeout=timeout) == 0, daemon.output()
    finally:
        daemon.kill()
        federation.stop()
    return daemon


def test_a_flood_of_oversized_junk_keeps_the_quarantine_within_its_bound(tmp_path: Path) -> None:
    table = job_table(
        4,
        job={"num_rounds": 2, "min_train_nodes": 3, "min_available_nodes": 3, "round_timeout_seconds": 30.0},
        daemon={"quarantine_max_bytes": 8 * 1024**2},
    )
    job = write_job(tmp_path, table)
    config = load_config(job)
    hostile = site_emails(4)[3]
    _drop_junk(config, hostile, JUNK_FILES, JUNK_BYTES)
    daemon = _run_to_the_end(tmp_path, job, _honest_specs(), timeout=90)
    assert _logged_refusals(daemon, hostile) == {"file_too_large": JUNK_FILES}
    quarantine = config.state.state_dir / "quarantine"
    kept = sum(p.stat().st_blocks * 512 for p in quarantine.rglob("*") if p.is_file())
    assert kept <= 8 * 1024**2  # 20 x 2 MiB of junk, and the quarantine holds its bound
    assert len(records_under(quarantine)) == JUNK_FILES  # every refusal recorded
    status = json.loads((config.state.state_dir / "status.json").read_text())
    assert status["quarantine_dropped"] == {hostile: JUNK_FILES}
    store = ModelStore(config.state.state_dir, config.job.name)
    assert_same_model(store.load(2), expected_model(config, 2, [0, 1, 2]))


def _peak_rss_mib(pid: int) -> float:
    """VmHWM of a live process, in MiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def test_a_2_gb_sparse_result_is_refused_before_it_is_read(tmp_path: Path) -> None:
    table = job_table(
        4,
        job={"num_rounds": 1, "min_train_nodes": 3, "min_available_nodes": 3},
        limits={"max_file_bytes": 4 * 1024**3},  # the size alone lets it through: only holes do not
        daemon={"rescan_interval_seconds": 0.5},
    )
    job = write_job(tmp_path, table)
    config = load_config(job)
    layout = JobLayout(config.syftbox.root, config.job.name, config.syftbox.aggregator_email)
    hostile = site_emails(4)[3]
    layout.results_dir(hostile).mkdir(parents=True)
    sparse = layout.results_dir(hostile) / f"{secrets.token_hex(16)}.result"
    with open(sparse, "wb") as handle:
        handle.truncate(2 * 1024**3)
    if sparse.stat().st_blocks * 512 * 8 >= sparse.stat().st_size:
        pytest.skip("this filesystem does not keep holes")
    daemon = DaemonProcess(job)
    try:
        refusal = daemon.wait_for("file.rejected", lambda e: e["datasite"] == hostile, timeout=30)
        peak = _peak_rss_mib(daemon.pid)
    finally:
        daemon.kill()
    assert refusal["reason"] == "sparse_file"
    print(f"\nsparse 2 GB result: daemon peak RSS {peak:.0f} MiB when it was refused")
    assert 0 < peak < 400  # reading it would have taken 2 GB


def test_the_daemon_s_memory_stays_flat_while_it_refuses_model_sized_junk(tmp_path: Path) -> None:
    # 60 junk files of 4 MiB each (240 MiB in all), each just under the result limit of a
    # 4 MiB model, so each is read in full before it is refused: the daemon must hold at
    # most a few of them at once, not all.
    junk_files, junk_bytes = 60, 4 * 1024**2
    table = job_table(
        4,
        model={"source": "random", "seed": 1, "arrays": {"w": {"shape": [1024, 1024], "init": "zeros"}}},
    )
    job = write_job(tmp_path, table)
    config = load_config(job)
    hostile = site_emails(4)[3]
    layout = JobLayout(config.syftbox.root, config.job.name, config.syftbox.aggregator_email)
    layout.results_dir(hostile).mkdir(parents=True)
    daemon = DaemonProcess(job)  # no datasite runs: it waits for them, and its intake works on
    try:
        daemon.wait_for("round.waiting_for_nodes", timeout=30)
        before = _peak_rss_mib(daemon.pid)
        _drop_junk_into(layout.results_dir(hostile), junk_files, junk_bytes)
        records = config.state.state_dir / "quarantine" / hostile / "records.jsonl"
        deadline = time.monotonic() + 60
        while _lines(records) < junk_files and time.monotonic() < deadline:
            time.sleep(0.1)
        after = _peak_rss_mib(daemon.pid)
    finally:
        daemon.kill()
    assert _lines(records) == junk_files
    print(f"\n{junk_files} x 4 MiB junk: daemon peak RSS {before:.0f} MiB before, {after:.0f} MiB after")
    assert after - before < 64  # 240 MiB of junk passed through it


def _drop_junk_into(results: Path, count: int, size: int) -> None:
    for _ in range(count):
        name = secrets.token_hex(16)
        (results / f".{name}.tmp").write_bytes(b"\x00" + os.urandom(size - 1))
        os.rename(results / f".{name}.tmp", results / f"{name}.result")


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_an_update_far_over_the_usual_size_is_refused_as_an_outlier(tmp_path: Path) -> None:
    # Default settings: outlier_norm_factor = 10, max_update_norm off. ds3 is honest in round 1
    # (so the rule has a reference), then sends the model plus 1,000 in every weight.
    table = job_table(
        4,
        job={"num_rounds": 3, "min_train_nodes": 3, "min_available_nodes": 4, "round_timeout_seconds": 6.0},
    )
    job = write_job(tmp_path, table)
    config = load_config(job)
    assert config.limits.outlier_norm_factor == 10.0 and config.limits.max_update_norm == 0
    sites = site_emails(4)
    poison = {scripted.ENV_INDEX: "3", scripted.ENV_POISON_FROM_ROUND: "2"}
    specs = [*_honest_specs(), DatasiteSpec(sites[3], "support.scripted:poisoning_train", poison)]
    daemon = _run_to_the_end(tmp_path, job, specs, timeout=120)
    refused = [e for e in daemon.events("file.rejected") if e["datasite"] == sites[3]]
    assert [(e["reason"], e["round"]) for e in refused] == [("norm_outlier", 2), ("norm_outlier", 3)]
    assert "median" in refused[0]["detail"]
    model = initial_model(config.model)
    model = scripted.expected_fedavg(model, [0, 1, 2, 3])  # round 1: ds3 still honest
    for _ in range(2):
        model = scripted.expected_fedavg(model, [0, 1, 2])
    store = ModelStore(config.state.state_dir, config.job.name)
    assert_same_model(store.load(3), model)


def test_a_flood_of_small_junk_is_refused_and_the_honest_rounds_finish(tmp_path: Path) -> None:
    # 2,000 small junk files in one datasite's results/ (the bounded version of the flood
    # in `make bench`): what is read of them is refused with a reason, and the honest
    # datasites' results are taken in turn with the junk, not after it.
    junk_files = 2000
    table = job_table(
        4,
        job={"num_rounds": 2, "min_train_nodes": 3, "min_available_nodes": 3, "round_timeout_seconds": 60.0},
    )
    job = write_job(tmp_path, table)
    config = load_config(job)
    hostile = site_emails(4)[3]
    _drop_junk(config, hostile, junk_files, 300)
    daemon = _run_to_the_end(tmp_path, job, _honest_specs(), timeout=120)
    # The honest rounds were served first: the job may end with junk still waiting.
    status = json.loads((config.state.state_dir / "status.json").read_text())
    refused = sum(status["quarantined"][hostile].values())
    assert 0 < refused <= junk_files
    assert set(status["quarantined"][hostile]) <= {"malformed", "unsupported_version", "truncated"}
    # Every refusal has its reason on disk (status.json was written at the end, while the
    # intake could still refuse a last batch).
    records = records_under(config.state.state_dir / "quarantine")
    assert len(records) >= refused
    assert all(record["reason"] for record in records)
    # The log says the same, mostly in summaries: a flood does not write a line per file.
    logged = _logged_refusals(daemon, hostile)
    # At a stop, the one file a worker thread may be refusing can be recorded after the
    # daemon's last log line: the record is the refusal's proof, the line best effort.
    assert len(records) - 1 <= sum(logged.values()) <= len(records)
    assert len([e for e in daemon.events("file.rejected") if e["datasite"] == hostile]) < len(records) / 2
    accepted = daemon.events("result.accepted")
    assert {e["datasite"] for e in accepted} == set(site_emails(3)) and len(accepted) == 6
    store = ModelStore(config.state.state_dir, config.job.name)
    assert_same_model(store.load(2), expected_model(config, 2, [0, 1, 2]))


def _logged_refusals(daemon: DaemonProcess, datasite: str) -> dict[str, int]:
    """Refusals of a datasite's files as the log tells them: one line each, or counted in a summary."""
    counts: Counter[str] = Counter()
    for event in daemon.events("file.rejected"):
        if event["datasite"] == datasite:
            counts[event["reason"]] += 1
    for event in daemon.events("file.rejected.unlogged"):
        if event["datasite"] == datasite:
            counts.update(event["reasons"])
    return dict(counts)
