"""The whole hostile corpus against a running job: honest datasites still get exactly FedAvg.

One in-process federation (daemon plus three datasite runners in one event
loop, as in tests/test_daemon.py). ds0's train function drops every corpus
file into the SyftBox tree while the round is open, in its own folder and
in others'. It then waits until the daemon has refused them all and only
then returns its honest answer. The models of rounds 1 and 2 must equal the
hand-computed FedAvg of the honest answers, and every hostile file must
have been quarantined or recorded with its expected reason.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from structlog.testing import CapturingLogger

from fl_orchestrator.config import load_config
from fl_orchestrator.core.reasons import Reason, printable
from fl_orchestrator.daemon.lifecycle import EXIT_DONE, Daemon
from fl_orchestrator.datasite.runner import DatasiteRunner, RunnerSettings
from fl_orchestrator.intake import loop as intake_loop_module
from fl_orchestrator.intake.quarantine import UNKNOWN_DATASITES
from fl_orchestrator.wire.layout import JobLayout

from hostile.corpus import (
    ANSWERED,
    CORPUS,
    HOSTILE,
    LIMITS,
    MAX_UPDATE_NORM,
    REFUSED_BY_DAEMON,
    Case,
)
from support import scripted
from support.jobs import AGGREGATOR, job_table, write_job
from support.records import records_under

# In-process federations: left out of `make test-fast`.
pytestmark = [pytest.mark.anyio, pytest.mark.integration]
WAIT_SECONDS = 20.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll from a worker thread (the train function), never sleeping long."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


class FederationScene:
    """The Scene of tests/hostile/corpus.py, read off a running daemon."""

    def __init__(self, layout: JobLayout, outside: Path) -> None:
        self.layout = layout
        self.outside = outside
        self.daemon: Daemon | None = None
        self.round = 1
        self.model: dict[str, np.ndarray] = {}
        self.previous_tasks: dict[str, str] = {}
        self.paths: dict[str, Path] = {}
        self.flagged_after_burst: list[str] = []
        self.failures: list[str] = []

    def tasks(self) -> dict[str, str]:
        assert self.daemon is not None and self.daemon.machine is not None
        current = self.daemon.machine.current
        assert current is not None
        return current.tasks

    def task_id(self, datasite: str) -> str:
        return self.tasks()[datasite]

    def counted_result(self, datasite: str) -> Path:
        return self.layout.result_path(datasite, self.task_id(datasite))

    def previous_result(self, datasite: str) -> Path:
        return self.layout.result_path(datasite, self.previous_tasks[datasite])

    def refusals(self) -> int:
        assert self.daemon is not None
        return sum(sum(reasons.values()) for reasons in self.daemon.quarantine.snapshot_counts().values())

    def recorded(self) -> set[str]:
        """Names of the cases whose file has a quarantine record."""
        assert self.daemon is not None
        sources = set()
        for record in records_under(self.daemon.state_dir / "quarantine"):
            sources.add(record["source"])
        return {name for name, path in self.paths.items() if printable(str(path), 4096) in sources}

    def answered(self, datasite: str) -> bool:
        assert self.daemon is not None and self.daemon.machine is not None
        current = self.daemon.machine.current
        return current is not None and datasite in current.answered()


def hostile_train(scene: FederationScene) -> Any:
    """ds0's train: drop this round's corpus files, wait for every refusal, answer honestly."""

    def train(arrays: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
        rnd = config["server-round"]
        scene.round = rnd
        scene.model = {k: v.copy() for k, v in arrays.items()}
        cases = [case for case in CORPUS if case.round == rnd]
        due = sum(1 for case in REFUSED_BY_DAEMON if case.round <= rnd)
        first = [case for case in cases if not (case.after_answer or case.restarts_watcher)]
        try:
            for case in first:
                scene.paths[case.name] = case.build(scene)
            if any(case.after_answer for case in cases):
                wait_until(lambda: scene.answered(ANSWERED), f"{ANSWERED} to be counted")
                for case in cases:
                    if case.after_answer:
                        scene.paths[case.name] = case.build(scene)
            last = [case for case in cases if case.restarts_watcher]
            wait_until(lambda: scene.refusals() >= due - sum(1 for c in last if c.reason), f"{due} refusals")
            for case in last:
                scene.paths[case.name] = case.build(scene)
            wait_until(lambda: scene.refusals() >= due, f"{due} refusals")
        except Exception as exc:  # reported by the test, not swallowed by the runner
            missing = [c.name for c in REFUSED_BY_DAEMON if c.round <= rnd and c.name not in scene.recorded()]
            scene.failures.append(f"round {rnd}: {type(exc).__name__}: {exc}; no record yet: {missing}")
        if rnd == 1:
            scene.flagged_after_burst = scene.daemon.quarantine.flagged_datasites() if scene.daemon else []
            scene.previous_tasks = dict(scene.tasks())
        return scripted.scripted_update(arrays, 0), scripted.num_examples_of(0), {"loss": 1.0}

    return train


def honest_train(index: int) -> Any:
    def train(arrays: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
        return scripted.scripted_update(arrays, index), scripted.num_examples_of(index), {"loss": 1.0}

    return train


async def run_federation(config_path: Path, scene: FederationScene, trains: list[Any]) -> Daemon:
    config = load_config(config_path)
    daemon = Daemon(config, handle_signals=False)
    scene.daemon = daemon
    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            for index, train in enumerate(trains):
                settings = RunnerSettings(
                    root=config.syftbox.root,
                    email=f"ds{index}@example.org",
                    aggregator=AGGREGATOR,
                    job=config.job.name,
                    train="unused:unused",
                    heartbeat_interval_seconds=0.2,
                    rescan_interval_seconds=0.3,
                )
                group.start_soon(DatasiteRunner(settings, train=train).run)
            await daemon.run()
            group.cancel_scope.cancel()
    return daemon


def assert_close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-6)


def expected_counts() -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for case in REFUSED_BY_DAEMON:
        assert case.reason is not None
        datasite = UNKNOWN_DATASITES if case.reason == Reason.UNKNOWN_DATASITE else _datasite_of(case)
        per_site = counts.setdefault(datasite, {})
        per_site[str(case.reason)] = per_site.get(str(case.reason), 0) + 1
    return counts


def _datasite_of(case: Case) -> str:
    # Which folder each case writes into: see tests/hostile/corpus.py.
    special = {
        "duplicate": ANSWERED,
        "not_selected": "ds3@example.org",
        "heartbeat_garbage": "ds3@example.org",
        "symlinked_results_folder": "ds4@example.org",
        "heartbeat_too_large": "ds4@example.org",
    }
    return special.get(case.name, HOSTILE)


async def test_hostile_corpus_is_refused_and_the_model_is_honest_fedavg(tmp_path: Path) -> None:
    table = job_table(
        5,
        job={"num_rounds": 2, "min_available_nodes": 3, "min_train_nodes": 3, "round_timeout_seconds": 40.0},
        # Move mode: this test checks where each kind of file ends up when it is moved.
        # Copy mode (the default, for real sync) is checked in test_daemon.py.
        daemon={
            "rescan_interval_seconds": 0.5,
            "quarantine_mode": "move",
            "partial_file_settle_seconds": 0.0,
        },
        limits={"max_update_norm": MAX_UPDATE_NORM, "max_file_bytes": LIMITS.max_file_bytes},
    )
    job = write_job(tmp_path, table)
    config = load_config(job)
    layout = JobLayout(config.syftbox.root, config.job.name, AGGREGATOR)
    scene = FederationScene(layout, tmp_path / "outside")
    # Folders a watcher must already be watching when files appear in them.
    for case in CORPUS:
        if case.prepare is not None:
            case.prepare(scene)
    passwd_before = os.stat("/etc/passwd") if os.path.exists("/etc/passwd") else None

    daemon = await run_federation(job, scene, [hostile_train(scene), honest_train(1), honest_train(2)])

    assert scene.failures == []
    assert daemon.exit_code == EXIT_DONE
    model0, model1 = daemon.store.load(0), daemon.store.load(1)
    assert_close(model1, scripted.expected_fedavg(model0, [0, 1, 2]))
    assert_close(daemon.store.load(2), scripted.expected_fedavg(model1, [0, 1, 2]))

    got, want = daemon.quarantine.snapshot_counts(), expected_counts()
    differing = [
        (site, reason, got.get(site, {}).get(reason), want.get(site, {}).get(reason))
        for site in set(got) | set(want)
        for reason in set(got.get(site, {})) | set(want.get(site, {}))
        if got.get(site, {}).get(reason) != want.get(site, {}).get(reason)
    ]
    assert differing == [], "(datasite, reason, refused, expected)"
    # Several cases may share a path (ds0's round-1 task file is first a symlink,
    # then the honest answer, then replayed in round 2): one record per refusal.
    records: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records_under(daemon.state_dir / "quarantine"):
        records[(record["source"], record["reason"])] = record
    assert len(records) == len(REFUSED_BY_DAEMON)
    for case in CORPUS:
        path = scene.paths[case.name]
        source = printable(str(path), 4096)
        if case.reason is None or case.behind_a_link:
            assert not any(key[0] == source for key in records) and os.path.lexists(path), case.name
            continue
        record = records.get((source, str(case.reason)))
        assert record is not None, case.name
        if case.moved:
            assert record["moved_to"] and os.path.lexists(record["moved_to"]), case.name
        else:
            assert record["moved_to"] is None and os.path.lexists(path), case.name
    moved_link = records[(printable(str(scene.paths["symlink_to_etc_passwd"]), 4096), "symlink")]["moved_to"]
    assert os.readlink(moved_link) == "/etc/passwd"
    if passwd_before is not None:
        after = os.stat("/etc/passwd")
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            passwd_before.st_ino,
            passwd_before.st_size,
            passwd_before.st_mtime_ns,
        )

    # ds0's burst flagged it; its counted answers cleared the flag again.
    assert HOSTILE in scene.flagged_after_burst
    assert daemon.quarantine.flagged_datasites() == []
    status = json.loads((daemon.state_dir / "status.json").read_text())
    assert status["quarantined"] == expected_counts()
    assert status["flagged"] == []


@pytest.mark.parametrize(
    ("strategy", "weighted"),
    [({"name": "fedavg"}, True), ({"name": "fedtrimmedavg", "beta": 0.0}, False)],
    ids=["fedavg-streaming", "trimmed-mean-whole-set"],
)
async def test_clip_mode_counts_the_clipped_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: dict[str, Any], weighted: bool
) -> None:
    # Whole-set strategies re-map the counted files at aggregation time:
    # they must see the clipped update too, not the bytes on disk.
    captured = CapturingLogger()
    monkeypatch.setattr(intake_loop_module, "log", captured)
    table = job_table(
        3,
        job={"num_rounds": 1, "min_train_nodes": 3},
        strategy=strategy,
        limits={
            "max_update_norm": MAX_UPDATE_NORM,
            "update_norm_action": "clip",
            "max_file_bytes": LIMITS.max_file_bytes,
        },
    )
    job = write_job(tmp_path, table)
    config = load_config(job)
    scene = FederationScene(JobLayout(config.syftbox.root, config.job.name, AGGREGATOR), tmp_path / "outside")

    def forty_times(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mine = scripted.scripted_update(arrays, 0)
        return {k: (arrays[k] + np.float32(40) * (mine[k] - arrays[k])).astype(np.float32) for k in arrays}

    # A train function that drops no corpus file: only its update is oversized.
    def train(arrays: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
        return forty_times(arrays), scripted.num_examples_of(0), {"loss": 1.0}

    daemon = await run_federation(job, scene, [train, honest_train(1), honest_train(2)])
    assert daemon.exit_code == EXIT_DONE
    model0 = daemon.store.load(0)
    big = forty_times(model0)
    diff = np.concatenate([(big[k].astype(np.float64) - model0[k]).ravel() for k in model0])
    norm = float(np.linalg.norm(diff))
    assert norm > MAX_UPDATE_NORM
    scale = MAX_UPDATE_NORM / norm
    clipped = {k: (model0[k] + scale * (big[k].astype(np.float64) - model0[k])) for k in big}
    clipped = {k: v.astype(np.float32) for k, v in clipped.items()}
    updates = [clipped, scripted.scripted_update(model0, 1), scripted.scripted_update(model0, 2)]
    weights = [scripted.num_examples_of(i) if weighted else 1 for i in (0, 1, 2)]
    expected = {}
    for name in model0:
        total = sum(w * u[name].astype(np.float64) for w, u in zip(weights, updates, strict=True))
        expected[name] = (total / sum(weights)).astype(np.float32)
    assert_close(daemon.store.load(1), expected)
    assert daemon.quarantine.snapshot_counts() == {}
    clips = [call for call in captured.calls if call.args[0] == "result.clipped"]
    assert len(clips) == 1 and clips[0].kwargs["datasite"] == HOSTILE
    assert clips[0].kwargs["update_norm"] == pytest.approx(norm, rel=1e-6)
