"""Which watched paths a datasite runner acts on (datasite/task_watch.py), without a watcher."""

from __future__ import annotations

from pathlib import Path

from watchfiles import Change

from fl_orchestrator.datasite.task_watch import PROBE_NAME, TaskPaths
from fl_orchestrator.wire.layout import JOB_ENDED, JobLayout

LAYOUT = JobLayout(Path("/r"), "job1", "agg@example.org")
MINE, OTHER = "ds0@example.org", "ds1@example.org"
PATHS = TaskPaths(LAYOUT, (MINE,))


def test_its_own_tasks_and_marker_and_models_are_accepted_another_datasites_are_not() -> None:
    accepted = [
        LAYOUT.task_path(MINE, "a1"),
        LAYOUT.job_ended_path(MINE),
        LAYOUT.models_dir / "global-r00001-abc.msgpack",
        LAYOUT.app_dir(MINE) / PROBE_NAME,
    ]
    refused = [
        LAYOUT.task_path(OTHER, "b1"),
        LAYOUT.job_ended_path(OTHER),
        LAYOUT.tasks_dir(OTHER),
        LAYOUT.task_path(MINE, "a1").with_name("a1.task.tmp"),
        LAYOUT.results_dir(MINE) / "a1.result",
        LAYOUT.tasks_dir(MINE) / JOB_ENDED / "x",
    ]
    assert all(PATHS.accept(Change.added, str(p)) for p in accepted)
    assert not any(PATHS.accept(Change.added, str(p)) for p in refused)
    assert not PATHS.accept(Change.deleted, str(LAYOUT.task_path(MINE, "a1")))


def test_every_folder_on_the_way_to_its_tasks_or_the_models_means_scan_again() -> None:
    on_the_way = [
        LAYOUT.datasites_dir / "agg@example.org",
        LAYOUT.aggregator_dir,
        LAYOUT.aggregator_dir / "tasks",
        LAYOUT.tasks_dir(MINE),
        LAYOUT.models_dir,
    ]
    for folder in on_the_way:
        assert PATHS.accept(Change.added, str(folder)) and PATHS.is_folder(str(folder)), folder
    assert not PATHS.is_folder(str(LAYOUT.datasites_dir))
    assert not PATHS.is_folder(str(LAYOUT.task_path(MINE, "a1")))


def test_a_path_names_the_datasite_whose_task_folder_holds_it() -> None:
    assert PATHS.datasite_of(str(LAYOUT.task_path(OTHER, "b1"))) == OTHER
    assert PATHS.datasite_of(str(LAYOUT.tasks_dir(MINE))) == MINE
    assert PATHS.datasite_of(str(LAYOUT.models_dir / "m")) is None
