"""Nothing is read before it is judged: limits from the model, sparse files, parts claims, and a
quarantine that cannot fill the disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fl_orchestrator.config.schema import LimitsSection
from fl_orchestrator.core.reasons import Reason
from fl_orchestrator.intake.quarantine import Quarantine
from fl_orchestrator.intake.reader import InboundReader, Refused, result_size_limit
from fl_orchestrator.wire.layout import FileKind, JobLayout
from fl_orchestrator.wire.messages import Envelope, PartsMessage, encode_parts, model_spec

from support.records import records_under

MODEL = {"w": np.zeros((256, 256), dtype=np.float32), "b": np.zeros(256, dtype=np.float32)}
SITE = "a@x.org"


def _reader(tmp_path: Path, limits: LimitsSection | None = None) -> tuple[InboundReader, JobLayout]:
    layout = JobLayout(tmp_path / "syftbox", "job", "agg@x.org")
    reader = InboundReader(layout, frozenset({SITE}), model_spec(MODEL), limits or LimitsSection())
    return reader, layout


def _result_file(layout: JobLayout, name: str, size: int, *, sparse: bool) -> Path:
    path = layout.result_path(SITE, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        if sparse:
            handle.truncate(size)
        else:
            handle.write(b"\x01" * size)
    return path


def test_the_default_limit_is_what_an_honest_result_of_the_model_takes(tmp_path: Path) -> None:
    reader, layout = _reader(tmp_path)
    payload = (256 * 256 + 256) * 4 + 2 * 5
    assert reader.result_limit == LimitsSection().max_header_bytes + payload
    assert result_size_limit(model_spec(MODEL), LimitsSection(max_file_bytes=1234)) == 1234
    path = _result_file(layout, "a" * 32, reader.result_limit + 1, sparse=False)
    outcome = reader.read_inbound(path, FileKind.RESULT, SITE)
    assert isinstance(outcome, Refused) and outcome.reason == Reason.FILE_TOO_LARGE


def test_a_sparse_file_under_the_limit_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, layout = _reader(tmp_path, LimitsSection(max_file_bytes=64 * 1024**2))
    path = _result_file(layout, "b" * 32, 32 * 1024**2, sparse=True)
    if os.stat(path).st_blocks * 512 * 8 >= os.stat(path).st_size:
        pytest.skip("this filesystem does not keep holes")

    def no_reads(*args: object) -> int:
        raise AssertionError("a sparse file was read")

    monkeypatch.setattr("fl_orchestrator.intake.reader.os.readv", no_reads)
    outcome = reader.read_inbound(path, FileKind.RESULT, SITE)
    assert isinstance(outcome, Refused) and outcome.reason == Reason.SPARSE_FILE
    quiet, _ = _reader(tmp_path, LimitsSection(max_file_bytes=64 * 1024**2, refuse_sparse_files=False))
    monkeypatch.undo()
    outcome = quiet.read_inbound(path, FileKind.RESULT, SITE)
    assert isinstance(outcome, Refused) and outcome.reason != Reason.SPARSE_FILE


def test_a_parts_claim_the_bytes_cannot_hold_is_refused_before_any_part_is_looked_at(tmp_path: Path) -> None:
    reader, layout = _reader(tmp_path)
    name = "c" * 32
    manifest = PartsMessage(Envelope("job", 1, "m", name, 1.0, None), 100_000, 1000, "0" * 64)
    path = layout.result_path(SITE, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_parts(manifest))
    outcome = reader.read_inbound(path, FileKind.RESULT, SITE)
    assert isinstance(outcome, Refused) and outcome.reason == Reason.BAD_FIELD
    assert "100000 parts for 1000 bytes" in outcome.detail


def test_the_quarantine_keeps_files_only_up_to_each_datasites_share(tmp_path: Path) -> None:
    root = tmp_path / "datasites"
    quarantine = Quarantine(tmp_path / "quarantine", keep_originals=True, max_bytes=3 * 1024**2, shares=3)
    kept = []
    for index in range(4):
        path = root / SITE / f"junk{index}.result"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(400 * 1024))
        kept.append(quarantine.refuse(path, SITE, Reason.MALFORMED, "junk", root=root))
    # A share is 1 MiB: two 400 KiB copies fit, the third and fourth are only recorded.
    assert [k is not None for k in kept] == [True, True, False, False]
    assert quarantine.snapshot_dropped() == {SITE: 2}
    assert len(records_under(tmp_path / "quarantine")) == 4
    # A restarted daemon counts what is already there.
    again = Quarantine(tmp_path / "quarantine", keep_originals=True, max_bytes=3 * 1024**2, shares=3)
    path = root / SITE / "junk9.result"
    path.write_bytes(os.urandom(400 * 1024))
    assert again.refuse(path, SITE, Reason.MALFORMED, "junk", root=root) is None
