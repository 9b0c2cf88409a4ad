"""The daemon and its datasite runners over real SyftBox sync (syftbox 0.4.0 on loopback).

Each party has its own SyftBox client and folder: the daemon runs against the
aggregator's, each runner against its own datasite's, and every file travels through a
local SyftBox server. The harness (tests/syftbox/) installs syftbox into a cached
environment of its own; when that is impossible these tests skip and say why
(FL_SYFTBOX_REQUIRED=1 makes that a failure). Each scenario runs once, in a
module-scoped fixture that collects everything and tears the processes down; the tests
then check one property each. Run with ``-s`` for the round times over sync next to
those of the same job over one shared folder.

The gaps this harness found (tests/syftbox/README.md) are fixed; the tests that showed
them now assert the fixes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_orchestrator.config import load_config
from fl_orchestrator.simulate.federation import DatasiteSpec, LocalFederation
from fl_orchestrator.storage.models import ModelStore, initial_model

from support import scripted
from support.jobs import AGGREGATOR, job_table, site_emails, write_job
from support.records import json_lines, quarantine_records
from syftbox.harness import (
    SYFTBOX_VERSION,
    ProcessSet,
    SyftBoxEnv,
    SyftBoxNetwork,
    SyftBoxUnavailable,
    SyncProblem,
    ensure_syftbox_env,
    wait_until,
)

TESTS_DIR = Path(__file__).resolve().parent
REQUIRED_ENV = "FL_SYFTBOX_REQUIRED"
SITES = site_emails(3)
JOB = "testjob"
# A heartbeat every 5 s (presence_ttl_seconds is 120): fewer in-place downloads by the client.
HEARTBEAT_SECONDS = "5"
# Reasons a file gets when it is read while the SyftBox client is still writing it in place.
IN_PLACE_WRITE_REASONS = ("empty_file", "truncated")

pytestmark = [pytest.mark.syftbox, pytest.mark.slow]

Event = dict[str, Any]


@dataclass
class Run:
    """Everything one scenario left behind, collected before its processes were stopped."""

    config_path: Path
    log_dir: Path
    events: list[Event]
    quarantine: list[dict[str, Any]]
    rejected_files: list[Path]
    sync_problems: list[SyncProblem]
    sync_errors: list[str]
    refused_requests: list[str]
    delete_attempts: list[str]
    files: dict[str, list[str]]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """The daemon's exit status."""
        return int(self.events[-1]["code"]) if self.events else -1

    @property
    def completed(self) -> dict[int, Event]:
        """round.completed events by round."""
        return {int(e["round"]): e for e in self.events if e.get("event") == "round.completed"}

    def rejections(self) -> list[Event]:
        """The daemon's file.rejected events."""
        return [e for e in self.events if e.get("event") == "file.rejected"]

    def daemon_log(self) -> str:
        """The end of the daemon's log, for failure messages."""
        path = self.log_dir / "daemon.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else "(no daemon log)"

    def quarantined_paths(self) -> set[str]:
        """What the daemon quarantined, as paths relative to the aggregator's ``datasites/``."""
        root = load_config(self.config_path).syftbox.root / "datasites"
        paths = set()
        for record in self.quarantine:
            with contextlib.suppress(ValueError):
                paths.add(str(Path(str(record.get("source"))).relative_to(root)))
        return paths

    def undone_deletions(self) -> list[SyncProblem]:
        """Deletions by the aggregator's client that the server refused and the client undid."""
        return [
            p
            for p in self.sync_problems
            if p.party == AGGREGATOR and p.action == "DELETE_REMOTE" and p.status == "rejected"
        ]

    def runner_events(self, email: str) -> list[Event]:
        """The JSON log events of one datasite runner."""
        return list(json_lines(self.log_dir / f"runner-{email}.log"))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def syftbox_env() -> SyftBoxEnv:
    """The cached syftbox install; skip (or fail, if required) when it cannot be made."""
    try:
        return ensure_syftbox_env()
    except SyftBoxUnavailable as exc:
        message = f"syftbox {SYFTBOX_VERSION} could not be installed in its own environment: {exc}"
        if os.environ.get(REQUIRED_ENV):
            pytest.fail(message)
        pytest.skip(message)


def _scenario(
    syftbox_env: SyftBoxEnv,
    request: pytest.FixtureRequest,
    folder: Path,
    emails: Sequence[str],
    play: Callable[[SyftBoxNetwork, ProcessSet, Path], tuple[Path, list[Event], dict[str, Any]]],
    *,
    settle_seconds: float = 2.5,
) -> Run:
    """Start a network, play a scenario on it, collect what it left, stop everything.

    Teardown is registered before anything starts, so a failure at any point (or an
    interrupted run) still stops every process by PID and process group and removes
    the SyftBox folders. Logs are kept in ``folder/logs`` for failure messages.
    """
    log_dir = folder / "logs"
    network = SyftBoxNetwork(syftbox_env, emails, log_dir=log_dir)
    runners = ProcessSet(log_dir)
    request.addfinalizer(network.close)
    request.addfinalizer(runners.close)
    try:
        seconds = network.start()
        print(f"\nsyftbox {SYFTBOX_VERSION}: server and {len(emails)} clients synced in {seconds:.1f} s")
        config_path, events, extra = play(network, runners, log_dir)
        runners.close()
        # Two sync cycles, so a refusal of the last files written would show.
        time.sleep(settle_seconds)
        return Run(
            config_path=config_path,
            log_dir=log_dir,
            events=events,
            quarantine=quarantine_records(load_config(config_path).state.state_dir),
            rejected_files=network.rejected_files(),
            sync_problems=network.sync_problems(),
            sync_errors=network.client_log_lines("ERROR", "Validation error"),
            refused_requests=network.server_log_lines(" 403 ", " 400 ", " 413 "),
            delete_attempts=network.client_log_lines("with action DELETE_REMOTE"),
            files={email: network.files(email) for email in emails},
            extra=extra,
        )
    except BaseException:
        print(network.log_tails())
        raise
    finally:
        runners.close()
        network.close()


def _start_runner(
    procs: ProcessSet, network: SyftBoxNetwork, email: str, index: int, env: Mapping[str, str] | None = None
) -> None:
    command = [
        sys.executable,
        "-m",
        "fl_orchestrator.cli.tool_main",
        "datasite",
        "--syftbox-root",
        str(network.party(email).data_dir),
        "--create",  # the client may not have made its folder yet
        "--email",
        email,
        "--aggregator",
        AGGREGATOR,
        "--job",
        JOB,
        "--train",
        "support.scripted:train",
        "--heartbeat-interval-seconds",
        HEARTBEAT_SECONDS,
        "--rescan-interval-seconds",
        "2",
        "--log-format",
        "json",
    ]
    paths = [str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    full_env[scripted.ENV_INDEX] = str(index)
    full_env.update(env or {})
    procs.start(f"runner-{email}", command, env=full_env)


def _sync_job(folder: Path, network: SyftBoxNetwork, num_sites: int = 3, **sections: dict[str, Any]) -> Path:
    """A job whose syftbox.root is the aggregator client's folder; state and logs stay outside it."""
    base: dict[str, dict[str, Any]] = {
        "job": {"available_timeout_seconds": 60.0, "max_round_retries": 0},
        "syftbox": {"root": str(network.party(AGGREGATOR).data_dir), "presence_ttl_seconds": 120.0},
        "daemon": {"rescan_interval_seconds": 2.0},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return write_job(folder, job_table(num_sites, **base))


def _run_daemon(
    config_path: Path,
    log_dir: Path,
    *,
    timeout_seconds: float,
    on_event: Callable[[Event], None] | None = None,
) -> list[Event]:
    federation = LocalFederation(config_path, log_dir, extra_pythonpath=[TESTS_DIR])
    events: list[Event] = []
    try:
        for event in federation.run_daemon(timeout_seconds=timeout_seconds):
            events.append(event)
            if on_event is not None:
                on_event(event)
    finally:
        federation.stop()
    return events


@pytest.fixture(scope="module")
def fedavg_run(
    syftbox_env: SyftBoxEnv, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Run:
    """3 datasites, 3 FedAvg rounds over sync; then the same job over one shared folder."""
    folder = tmp_path_factory.mktemp("fedavg")

    def play(
        network: SyftBoxNetwork, runners: ProcessSet, log_dir: Path
    ) -> tuple[Path, list[Event], dict[str, Any]]:
        config_path = _sync_job(folder / "job", network, job={"num_rounds": 3, "round_timeout_seconds": 60.0})
        for index, email in enumerate(SITES):
            _start_runner(runners, network, email, index)
        events = _run_daemon(config_path, log_dir, timeout_seconds=120)
        return config_path, events, {}

    run = _scenario(syftbox_env, request, folder, [AGGREGATOR, *SITES], play)
    run.extra["shared_events"] = _run_shared_folder(folder / "shared")
    return run


@pytest.fixture(scope="module")
def straggler_run(
    syftbox_env: SyftBoxEnv, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Run:
    """ds2's client stops once ds2 has round 2's task and starts again when round 2 is over."""
    folder = tmp_path_factory.mktemp("straggler")
    offline = SITES[2]
    extra: dict[str, Any] = {"offline": offline, "round_timeout": 20.0}

    def play(
        network: SyftBoxNetwork, runners: ProcessSet, log_dir: Path
    ) -> tuple[Path, list[Event], dict[str, Any]]:
        config_path = _sync_job(
            folder / "job",
            network,
            job={
                "num_rounds": 4,
                "round_timeout_seconds": extra["round_timeout"],
                "min_train_nodes": 2,
                "min_available_nodes": 3,
            },
        )
        for index, email in enumerate(SITES):
            # ds2 trains for 3 s, so its client is gone before its round-2 result exists.
            _start_runner(
                runners, network, email, index, {scripted.ENV_DELAY: "3"} if email == offline else None
            )
        runner_log = log_dir / f"runner-{offline}.log"

        def has(event: str, rnd: int) -> bool:
            return any(e.get("event") == event and e.get("round") == rnd for e in json_lines(runner_log))

        daemon_done = threading.Event()

        def take_offline() -> None:
            try:
                wait_until(
                    lambda: daemon_done.is_set() or has("task.received", 2),
                    timeout_seconds=120,
                    what="round 2's task at ds2",
                    interval_seconds=0.05,
                )
            except TimeoutError:
                return
            if not daemon_done.is_set():
                network.stop_client(offline)
                extra["offline_at"] = time.time()

        watcher = threading.Thread(target=take_offline, daemon=True)
        watcher.start()

        def back_online(event: Event) -> None:
            if event.get("event") == "round.completed" and event.get("round") == 2:
                network.start_client(offline)
                extra["online_again_at"] = time.time()

        try:
            events = _run_daemon(config_path, log_dir, timeout_seconds=150, on_event=back_online)
        finally:
            daemon_done.set()
            watcher.join(timeout=10)
        return config_path, events, extra

    return _scenario(syftbox_env, request, folder, [AGGREGATOR, *SITES], play)


@pytest.fixture(scope="module")
def big_model_run(
    syftbox_env: SyftBoxEnv, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Run:
    """One datasite, one round, a 10.8 MB model (over syftbox 0.4.0's 10 MB cap)."""
    folder = tmp_path_factory.mktemp("big_model")
    site = SITES[0]

    def play(
        network: SyftBoxNetwork, runners: ProcessSet, log_dir: Path
    ) -> tuple[Path, list[Event], dict[str, Any]]:
        config_path = _sync_job(
            folder / "job",
            network,
            num_sites=1,
            job={
                "num_rounds": 1,
                "round_timeout_seconds": 12.0,
                "min_train_nodes": 1,
                "min_available_nodes": 1,
            },
            model={"arrays": {"w": {"shape": [2_700_000], "init": "zeros"}}},
        )
        _start_runner(runners, network, site, 0)
        return config_path, _run_daemon(config_path, log_dir, timeout_seconds=90), {}

    return _scenario(syftbox_env, request, folder, [AGGREGATOR, site], play)


# --------------------------------------------------------------------------- helpers


def _assert_models(config_path: Path, participants: Sequence[Sequence[int]]) -> None:
    """Every saved round model equals expected_fedavg applied round by round."""
    config = load_config(config_path)
    store = ModelStore(config.state.state_dir, config.job.name)
    model = initial_model(config.model)
    expected = [model]
    for indices in participants:
        model = scripted.expected_fedavg(model, list(indices))
        expected.append(model)
    assert store.rounds() == list(range(len(expected)))
    for rnd, want in enumerate(expected):
        saved = store.load(rnd)
        for name, value in want.items():
            scale = max(1.0, float(np.max(np.abs(value))))
            error = float(np.max(np.abs(saved[name].astype(np.float64) - value)))
            assert error <= 1e-6 * scale, f"round {rnd}, array {name}: off by {error}"


def _late(run: Run) -> list[Event]:
    """The daemon's refusals of the offline datasite's late result."""
    offline = run.extra["offline"]
    return [e for e in run.rejections() if e.get("datasite") == offline and e.get("reason") == "round_closed"]


def _collect_seconds(events: Sequence[Event]) -> list[float]:
    return [float(e["collect_seconds"]) for e in events if e.get("event") == "round.completed"]


def _run_shared_folder(folder: Path) -> list[Event]:
    """The same scripted job with LocalFederation: every process over one folder."""
    table = job_table(
        3,
        job={"num_rounds": 3, "round_timeout_seconds": 60.0, "available_timeout_seconds": 60.0},
        daemon={"rescan_interval_seconds": 2.0},
    )
    federation = LocalFederation(write_job(folder, table), folder / "logs", extra_pythonpath=[TESTS_DIR])
    specs = [
        DatasiteSpec(e, "support.scripted:train", {scripted.ENV_INDEX: str(i)}) for i, e in enumerate(SITES)
    ]
    try:
        federation.start_datasites(specs, heartbeat_interval_seconds=1.0)
        events = list(federation.run_daemon(timeout_seconds=60))
    finally:
        federation.stop()
    assert events[-1]["code"] == 0, (folder / "logs" / "daemon.log").read_text()
    return events


# --------------------------------------------------------------------------- FedAvg over sync


def test_fedavg_over_sync_ends_with_the_hand_computed_model(fedavg_run: Run) -> None:
    run = fedavg_run
    assert run.exit_code == 0, run.daemon_log()
    assert sorted(run.completed) == [1, 2, 3]
    for event in run.completed.values():
        assert (event["succeeded"], event["failed"], event["timed_out"]) == (3, 0, 0), event
    # Train metrics are weighted by num_examples: (0*10 + 1*20 + 2*30) / 60.
    assert run.completed[1]["train_metrics"]["loss"] == pytest.approx(80 / 60)
    _assert_models(run.config_path, [[0, 1, 2]] * 3)
    status = json.loads((load_config(run.config_path).state.state_dir / "status.json").read_text())
    assert status["state"] == "done"
    for email in SITES:
        events = run.runner_events(email)
        assert [e["round"] for e in events if e.get("event") == "task.answered" and e.get("ok")] == [1, 2, 3]
        assert not [e for e in events if e.get("event") in ("train.failed", "task.expired")]


def test_fedavg_over_sync_nothing_is_refused_by_the_sync(fedavg_run: Run) -> None:
    run = fedavg_run
    assert run.rejected_files == [], "files renamed *.syftrejected.* by a refused upload"
    assert [line for line in run.sync_errors if "Validation error" in line] == []
    allowed = ("/sync/get_metadata", "/sync/delete")
    writes = [line for line in run.refused_requests if not any(a in line for a in allowed)]
    assert writes == [], "uploads or diffs the server refused"
    # The only refusals allowed are the known ones: the aggregator's client deleting, at
    # the server, a file of another datasite that the daemon had moved into quarantine.
    quarantined = run.quarantined_paths()
    undone = run.undone_deletions()
    assert [p for p in run.sync_problems if p not in undone] == [], "other rejected or failed sync actions"
    assert all(p.path in quarantined for p in undone), (undone, quarantined)
    deletes = [line for line in run.delete_attempts if not any(q in line for q in quarantined)]
    assert deletes == [], "a party tried to delete at the server a file the daemon had not quarantined"
    # Refused files are copied, never moved out of another party's folder: no deletes.
    assert run.delete_attempts == [], run.delete_attempts


def test_fedavg_over_sync_the_daemon_quarantines_nothing(fedavg_run: Run) -> None:
    run = fedavg_run
    protocol = [r for r in run.quarantine if r.get("reason") not in IN_PLACE_WRITE_REASONS]
    assert protocol == [], "the daemon refused files that were complete"
    assert len(run.rejections()) == len(run.quarantine)
    # Files caught while the client wrote them in place are waited for, not refused.
    assert run.quarantine == []


def test_fedavg_round_times_over_sync_next_to_one_shared_folder(
    fedavg_run: Run, request: pytest.FixtureRequest
) -> None:
    sync = _collect_seconds(fedavg_run.events)
    shared = _collect_seconds(fedavg_run.extra["shared_events"])
    assert len(sync) == 3 and len(shared) == 3
    assert all(0 < t < 60 for t in sync)
    print("\ncollect_seconds per round, 3 datasites, FedAvg:")
    for label, values in (("real SyftBox sync", sync), ("one shared folder", shared)):
        cells = "  ".join(f"{v:7.3f}" for v in values)
        print(f"  {label:<18} {cells}   median {float(np.median(values)):.3f}")
    request.node.user_properties.append(("collect_seconds_syftbox_sync", sync))
    request.node.user_properties.append(("collect_seconds_shared_folder", shared))


def test_each_datasite_receives_only_its_own_tasks(fedavg_run: Run) -> None:
    prefix = f"{AGGREGATOR}/app_data/fl_orchestrator/{JOB}/tasks/"
    for email in SITES:
        folders = {f[len(prefix) :].split("/")[0] for f in fedavg_run.files[email] if f.startswith(prefix)}
        assert folders == {email}
    # ... and the aggregator reads every datasite's job folder.
    for email in SITES:
        results = f"{email}/app_data/fl_orchestrator/{JOB}/results/"
        assert any(f.startswith(results) for f in fedavg_run.files[AGGREGATOR])


def test_no_datasite_client_tries_to_fetch_another_datasites_tasks(fedavg_run: Run) -> None:
    run = fedavg_run
    failed = [line for line in run.sync_errors if "Failed to sync file" in line]
    tasks = [line for line in failed if f"{AGGREGATOR}/app_data/fl_orchestrator/{JOB}/tasks/" in line]
    # Files the daemon moved into quarantine can also fail to sync (known gaps 2 and 3).
    quarantined = run.quarantined_paths()
    others = [line for line in failed if line not in tasks and not any(q in line for q in quarantined)]
    if others:
        pytest.fail(f"sync failures other than the known ones: {others[:3]}")
    assert tasks == [], f"{len(tasks)} failed attempts to fetch another datasite's task, e.g. {tasks[:1]}"


# --------------------------------------------------------------------------- a datasite goes offline


def test_an_offline_datasite_times_out_and_the_round_aggregates_the_rest(straggler_run: Run) -> None:
    run = straggler_run
    offline, timeout = run.extra["offline"], run.extra["round_timeout"]
    assert "offline_at" in run.extra, "ds2 never received round 2's task"
    assert run.exit_code == 0, run.daemon_log()
    assert sorted(run.completed) == [1, 2, 3, 4]
    assert run.completed[1]["succeeded"] == 3
    # Round 2: ds2 trained and wrote its result while its client was stopped, so the
    # result never synced; the round waited the full timeout and aggregated the others.
    second = run.completed[2]
    assert (second["succeeded"], second["timed_out"], second["stragglers"]) == (2, 1, [offline])
    assert second["collect_seconds"] >= timeout - 0.5
    answered = [
        e for e in run.runner_events(offline) if e.get("event") == "task.answered" and e.get("round") == 2
    ]
    assert answered and answered[0]["ok"]
    answered_at = datetime.fromisoformat(answered[0]["timestamp"]).timestamp()
    assert answered_at > run.extra["offline_at"], "ds2 answered round 2 before its client stopped"
    # Back online, ds2 answers round 3 in time.
    assert run.completed[3]["succeeded"] == 3 and run.completed[4]["succeeded"] == 3
    _assert_models(run.config_path, [[0, 1, 2], [0, 1], [0, 1, 2], [0, 1, 2]])
    # Its late round-2 result did reach the aggregator, and was refused as round_closed.
    late = _late(run)
    assert late, "the late result never reached the daemon"
    others = [e for e in run.rejections() if e not in late and e.get("reason") not in IN_PLACE_WRITE_REASONS]
    assert others == []
    print(f"\ncollect_seconds per round, ds2 offline in round 2: {_collect_seconds(run.events)}")
    print(
        f"late result refused {len(late)} times; aggregator's client tried {len(run.delete_attempts)}"
        f" deletions at the server, refused: {sum('/sync/delete' in line for line in run.refused_requests)}"
    )


def test_a_late_result_is_refused_once_and_left_in_place(straggler_run: Run) -> None:
    run = straggler_run
    late = _late(run)
    if len({e["path"] for e in late}) != 1:
        pytest.fail(f"expected one late result to reach the daemon, got {late}")
    assert len(late) == 1, f"the same late result was refused {len(late)} times"
    assert run.delete_attempts == [], run.delete_attempts
    assert [line for line in run.refused_requests if "/sync/delete" in line] == []
    assert run.undone_deletions() == []


# --------------------------------------------------------------------------- sizes


def test_a_model_over_10_mb_reaches_the_datasites(big_model_run: Run) -> None:
    # The model (10.8 MB) travels as parts under the client's 10 MB cap; the result too.
    run = big_model_run
    refused = [line for line in run.sync_errors if "larger than 10MB" in line]
    assert refused == [], refused[:2]
    assert run.exit_code == 0, run.daemon_log()
    _assert_models(run.config_path, [[0]])
