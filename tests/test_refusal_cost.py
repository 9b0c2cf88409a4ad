"""What a refusal costs stays small and bounded: folders opened once, junk kept from memory,
one record line per file in a bounded records file, and a log that summarises a flood."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import CapturingLogger

from fl_orchestrator.config.schema import LimitsSection
from fl_orchestrator.core.reasons import Reason
from fl_orchestrator.intake import quarantine_files
from fl_orchestrator.intake import refusal_log as refusal_log_module
from fl_orchestrator.intake.quarantine import RECORDS_MIN_BYTES, Quarantine
from fl_orchestrator.intake.reader import InboundReader, Refused
from fl_orchestrator.intake.refusal_log import RefusalLog
from fl_orchestrator.wire.layout import FileKind, JobLayout
from fl_orchestrator.wire.messages import model_spec

from support.records import records_under

SITE = "flood@x.org"
MODEL = {"w": np.zeros(64, dtype=np.float32)}


def _reader(tmp_path: Path) -> tuple[InboundReader, JobLayout]:
    layout = JobLayout(tmp_path / "syftbox", "job", "agg@x.org")
    return InboundReader(layout, frozenset({SITE}), model_spec(MODEL), LimitsSection()), layout


def _junk(layout: JobLayout, name: str, data: bytes = b"\x93junk") -> Path:
    path = layout.result_path(SITE, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_small_refused_file_is_kept_in_its_record_as_read_without_opening_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, layout = _reader(tmp_path)
    path = _junk(layout, "a" * 32, b"\x00not a message")
    outcome = reader.read_inbound(path, FileKind.RESULT, SITE)
    assert isinstance(outcome, Refused) and outcome.content == b"\x00not a message"
    # The datasite rewrites its file after it was judged: the kept copy is what was judged.
    path.write_bytes(b"something else")

    def no_walk(*args: object) -> int:
        raise AssertionError("the datasite's folder was opened again")

    monkeypatch.setattr(quarantine_files, "_open_parent", no_walk)
    quarantine = Quarantine(tmp_path / "quarantine", keep_originals=True)
    kept = quarantine.refuse(
        path, SITE, outcome.reason, outcome.detail, root=layout.datasites_dir, content=outcome.content
    )
    assert kept is None  # no file of its own: a flood of tiny files would cost an inode each
    assert path.read_bytes() == b"something else"  # copy mode leaves the original alone
    (record,) = records_under(tmp_path / "quarantine")
    assert base64.b64decode(record["content_base64"]) == b"\x00not a message"
    assert record["moved_to"] is None and record["size"] == len(b"\x00not a message")
    assert [p.name for p in (tmp_path / "quarantine" / SITE).iterdir()] == ["records.jsonl"]
    # Past the datasite's share, the record says why the bytes were not kept.
    full = Quarantine(tmp_path / "full", keep_originals=True, max_bytes=4)
    full.refuse(path, SITE, outcome.reason, "", root=layout.datasites_dir, content=outcome.content)
    (record,) = records_under(tmp_path / "full")
    assert record["content_base64"] is None and "used up" in record["move_error"]
    assert full.snapshot_dropped() == {SITE: 1}


def test_a_large_refused_file_brings_no_bytes_along(tmp_path: Path) -> None:
    reader, layout = _reader(tmp_path)
    path = _junk(layout, "b" * 32, b"\x01" * 200)
    big = _junk(layout, "c" * 32, b"\x01" * (reader.result_limit + 1))
    small = reader.read_inbound(path, FileKind.RESULT, SITE)
    too_large = reader.read_inbound(big, FileKind.RESULT, SITE)
    assert isinstance(small, Refused) and small.content == b"\x01" * 200
    assert isinstance(too_large, Refused) and too_large.reason == Reason.FILE_TOO_LARGE
    assert too_large.content is None  # judged from its size: never read


def test_a_replaced_results_folder_is_walked_to_again_not_read_through_the_old_one(tmp_path: Path) -> None:
    reader, layout = _reader(tmp_path)
    first = _junk(layout, "d" * 32, b"first")
    assert reader.read_inbound(first, FileKind.RESULT, SITE).content == b"first"  # type: ignore[union-attr]
    results = first.parent
    results.rename(results.with_name("old-results"))
    results.mkdir()
    again = _junk(layout, "d" * 32, b"second")
    outcome = reader.read_inbound(again, FileKind.RESULT, SITE)
    assert isinstance(outcome, Refused) and outcome.content == b"second"
    # Swapped for a link to another folder: refused as a link, as a fresh walk would.
    results.rename(results.with_name("newer-results"))
    results.symlink_to(results.with_name("old-results"))
    outcome = reader.read_inbound(again, FileKind.RESULT, SITE)
    assert isinstance(outcome, Refused) and outcome.reason == Reason.SYMLINK


def test_the_folder_cache_keeps_at_most_its_size_open(tmp_path: Path) -> None:
    reader, layout = _reader(tmp_path)
    reader.folders.size = 4
    before = len(os.listdir("/proc/self/fd"))
    for index in range(10):
        path = layout.datasites_dir / SITE / "app_data" / f"f{index}" / ("e" * 32 + ".result")
        path.parent.mkdir(parents=True)
        path.write_bytes(b"junk")
        reader.read_inbound(path, FileKind.RESULT, SITE)
    assert len(os.listdir("/proc/self/fd")) - before <= 4
    reader.folders.close()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_records_are_lines_in_one_file_started_afresh_past_the_share(tmp_path: Path) -> None:
    root = tmp_path / "datasites"
    quarantine = Quarantine(tmp_path / "quarantine", keep_originals=True, max_bytes=0)
    folder = tmp_path / "quarantine" / SITE
    path = root / SITE / "results" / "x.result"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    detail = "d" * 2000  # about 2.4 KB a record: 1 MiB holds about 430
    for _ in range(1000):
        quarantine.refuse(path, SITE, Reason.MALFORMED, detail, root=root, content=b"x")
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    # Nothing was kept (no share), and the records stay within two files of 1 MiB.
    assert set(sizes) == {"records.jsonl", "records.1.jsonl"}
    assert all(size <= RECORDS_MIN_BYTES for size in sizes.values())
    newest = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    assert newest and all(r["reason"] == "malformed" and "used up" in r["move_error"] for r in newest)
    assert quarantine.snapshot_counts() == {SITE: {"malformed": 1000}}


def test_a_flood_is_logged_as_a_burst_a_second_and_a_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    captured = CapturingLogger()
    monkeypatch.setattr(refusal_log_module, "log", captured)
    now = [100.0]
    lines = RefusalLog(burst=3, clock=lambda: now[0])
    for index in range(10):
        lines.rejected(SITE, "malformed" if index % 2 else "truncated", "records.jsonl", path=str(index))
    lines.rejected("honest@x.org", "malformed", "records.jsonl")  # another datasite has its own burst
    assert [c.args[0] for c in captured.calls] == ["file.rejected"] * 4
    now[0] += 1.0  # the next second: the counted ones are summarised before the next line
    lines.rejected(SITE, "malformed", "records.jsonl")
    summary, line = captured.calls[4:]
    assert summary.args[0] == "file.rejected.unlogged"
    assert summary.kwargs["refused"] == 7 and summary.kwargs["reasons"] == {"malformed": 4, "truncated": 3}
    assert line.args[0] == "file.rejected"
    for _ in range(5):
        lines.rejected(SITE, "malformed", "records.jsonl")
    lines.flush(lambda bucket: f"{bucket}/records.jsonl")  # the intake ran dry
    assert captured.calls[-1].args[0] == "file.rejected.unlogged"
    assert captured.calls[-1].kwargs["refused"] == 3
    lines.flush(lambda bucket: bucket)
    assert captured.calls[-1].kwargs["refused"] == 3  # nothing left to say


def test_after_the_final_flush_every_refusal_has_its_own_line(monkeypatch: pytest.MonkeyPatch) -> None:
    captured = CapturingLogger()
    monkeypatch.setattr(refusal_log_module, "log", captured)
    lines = RefusalLog(burst=1, clock=lambda: 5.0)
    lines.rejected(SITE, "malformed", None)
    lines.rejected(SITE, "malformed", None)  # counted
    lines.flush(lambda bucket: bucket, final=True)  # the intake stopped
    lines.rejected(SITE, "truncated", None)  # a worker thread's last file
    assert [c.args[0] for c in captured.calls] == ["file.rejected", "file.rejected.unlogged", "file.rejected"]
