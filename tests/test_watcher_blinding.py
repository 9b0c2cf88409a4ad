"""Nothing in the synced tree can blind or stall the watcher (watched as the daemon does)."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from fl_orchestrator.intake.watcher import MAX_RESULT_SUBFOLDERS, PathBatch, plan_watch, watch_job_files
from fl_orchestrator.protocols.native import NativeWire
from fl_orchestrator.wire.layout import JobLayout

pytestmark = pytest.mark.anyio
SITES = ("good@x.org", "evil@x.org", "odd@x.org")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _hostile_tree(layout: JobLayout) -> None:
    evil = layout.datasites_dir / "evil@x.org"
    (evil / "app_data" / "other").mkdir(parents=True)
    deep = evil / "app_data" / "other"
    for level in range(200):
        deep = deep / f"d{level}"
    deep.mkdir(parents=True)
    locked = evil / "app_data" / "locked"
    locked.mkdir()
    os.chmod(locked, 0)
    os.mkfifo(evil / "app_data" / "fifo")
    os.mkdir(os.fsencode(evil / "app_data") + b"/\xff\xfe")
    job = layout.app_dir("evil@x.org")
    job.mkdir(parents=True)
    os.symlink("/etc", layout.results_dir("evil@x.org"))
    for site in ("good@x.org", "odd@x.org"):
        layout.results_dir(site).mkdir(parents=True)
    (layout.results_dir("good@x.org") / "sub").mkdir()
    (layout.datasites_dir / "mallory@x.org").mkdir()
    layout.aggregator_dir.mkdir(parents=True)  # the aggregator's own folder: not a stranger's


async def test_hostile_folders_are_reported_once_and_honest_events_keep_flowing(tmp_path: Path) -> None:
    layout = JobLayout(tmp_path / "syftbox", "job", "agg@x.org")
    _hostile_tree(layout)
    plan = plan_watch(NativeWire(layout), SITES, set())
    assert "evil@x.org" in plan.refused and plan.refused["evil@x.org"][0] == "symlink"
    send, receive = anyio.create_memory_object_stream[PathBatch](100)
    honest = layout.results_dir("good@x.org") / ("a" * 32 + ".result")
    seen: list[Path] = []
    with capture_logs() as logs:
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: watch_job_files(
                    NativeWire(layout), SITES, send, debounce_milliseconds=5, rescan_interval_seconds=3600.0
                )
            )
            await anyio.sleep(0.3)  # the watch is set up (the start-up scan found nothing to send)
            # A name watchfiles cannot decode, inside a watched folder: only odd@x.org goes blind.
            os.mkdir(os.fsencode(layout.results_dir("odd@x.org")) + b"/\xff\xfe")
            await anyio.sleep(0.3)
            honest.write_bytes(b"x")
            with anyio.fail_after(5):  # events only: the next rescan is an hour away
                while honest not in seen:
                    seen.extend(await receive.receive())
            group.cancel_scope.cancel()
    events = [
        (e["event"], e.get("datasite"), e.get("reason")) for e in logs if e["event"].startswith("watcher.")
    ]
    assert ("watcher.folder_refused", "evil@x.org", "symlink") in events
    assert ("watcher.datasite_unwatched", "odd@x.org", "bad_name") in events
    assert ("watcher.folder_unexpected", "good@x.org", "subfolder") in events
    assert ("watcher.folder_unexpected", "mallory@x.org", "unlisted_folder") in events
    assert not [e for e in events if e[1] == "agg@x.org"]
    assert len(events) == len(set(events)), events  # each reported once
    assert not [e for e in events if e[0] == "watcher.restarted"], events


def test_the_rescan_finds_results_one_folder_down_but_no_deeper_and_in_few_folders(tmp_path: Path) -> None:
    # A file put inside results/<sub>/ while the watcher was re-planning must still be refused
    # (bad_name), so the rescan looks one level down, in at most MAX_RESULT_SUBFOLDERS folders.
    layout = JobLayout(tmp_path / "syftbox", "job", "agg@x.org")
    results = layout.results_dir("good@x.org")
    nested = results / "sub" / ("b" * 32 + ".result")
    deeper = results / "sub" / "deeper" / ("c" * 32 + ".result")
    deeper.parent.mkdir(parents=True)
    nested.write_bytes(b"x")
    deeper.write_bytes(b"x")
    for index in range(MAX_RESULT_SUBFOLDERS + 5):
        folder = results / f"z{index:03d}"
        folder.mkdir()
        (folder / ("d" * 32 + ".result")).write_bytes(b"x")
    found = list(NativeWire(layout).scan(("good@x.org",)))
    assert nested in found
    assert deeper not in found
    assert len(found) == MAX_RESULT_SUBFOLDERS  # "sub" and the first 15 z folders (sorted), one file each


def test_the_rescan_never_lists_a_folder_through_a_link(tmp_path: Path) -> None:
    # A results/ that is a link (here to a folder full of *.result names), or a link inside
    # results/, is not listed: the rescan reads no names from where a link points.
    layout = JobLayout(tmp_path / "syftbox", "job", "agg@x.org")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ("e" * 32 + ".result")).write_bytes(b"x")
    linked = layout.results_dir("linked@x.org")
    linked.parent.mkdir(parents=True)
    linked.symlink_to(elsewhere)
    under_link = layout.results_dir("under@x.org")
    (layout.datasites_dir / "under@x.org").mkdir(parents=True)
    (layout.datasites_dir / "under@x.org" / "app_data").symlink_to(linked.parent.parent.parent)
    real = layout.results_dir("good@x.org")
    real.mkdir(parents=True)
    (real / "sub").symlink_to(elsewhere)
    (real / ("f" * 32 + ".result")).write_bytes(b"x")
    found = list(NativeWire(layout).scan(("linked@x.org", "under@x.org", "good@x.org")))
    assert found == [real / ("f" * 32 + ".result")]
    assert under_link.exists()  # the link does lead somewhere: the scan chose not to follow it


async def test_a_paced_rescan_lists_every_file_a_few_datasites_per_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fl_orchestrator.intake import watcher

    layout = JobLayout(tmp_path / "syftbox", "job", "agg@x.org")
    sites = tuple(f"ds{i:03d}@x.org" for i in range(2 * watcher._RESCAN_DATASITES_PER_HOP + 5))
    for site in sites:
        layout.results_dir(site).mkdir(parents=True)
        (layout.results_dir(site) / ("b" * 32 + ".result")).write_bytes(b"x")
    wire = NativeWire(layout)
    hops: list[tuple[str, ...]] = []
    list_files = watcher._listed_files

    def recorded(tree: NativeWire, chunk: tuple[str, ...]) -> PathBatch:
        hops.append(chunk)
        return list_files(tree, chunk)

    monkeypatch.setattr(watcher, "_listed_files", recorded)
    with anyio.fail_after(10):
        listed = await watcher._rescan_paced(wire, sites)
    assert sorted(listed) == sorted(wire.scan(sites)) and len(listed) == len(sites)
    # Three hops, none over the limit: the interpreter lock is let go between them.
    per_hop = watcher._RESCAN_DATASITES_PER_HOP
    assert [len(hop) for hop in hops] == [per_hop, per_hop, 5]
    assert tuple(site for hop in hops for site in hop) == sites
