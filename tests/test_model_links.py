"""The round's model is written once: the checkpoint names it, the broadcast links it."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from fl_orchestrator.datasite.model_files import read_model_bytes
from fl_orchestrator.protocols.native import Publisher
from fl_orchestrator.storage.models import ModelStore
from fl_orchestrator.wire.frames import FrameLimits
from fl_orchestrator.wire.layout import JobLayout
from fl_orchestrator.wire.messages import ModelMessage, decode_message

JOB, AGG, SITE = "job1", "agg@example.org", "ds0@example.org"
MODEL = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float64)}


def _saved(tmp_path: Path) -> tuple[ModelStore, Publisher, JobLayout]:
    store = ModelStore(tmp_path / "state", JOB)
    store.save(3, MODEL)
    layout = JobLayout(tmp_path / "root", JOB, AGG)
    return store, Publisher(layout, (SITE,)), layout


def test_the_broadcast_is_a_link_to_the_state_folders_file_and_datasites_read_it(tmp_path: Path) -> None:
    store, publisher, layout = _saved(tmp_path)
    saved = store.saved(3, MODEL)
    assert saved is not None
    broadcast = publisher.write_model(4, MODEL, saved)
    published = layout.aggregator_dir / broadcast.ref.path
    assert broadcast.linked and published.stat().st_ino == store.path_for(3).stat().st_ino
    assert broadcast.ref.sha256 == hashlib.sha256(published.read_bytes()).hexdigest()
    assert publisher.bytes_written == 0
    # What a datasite does with it: the bytes match the reference and decode as this job's model.
    data = read_model_bytes(published, broadcast.ref)
    message = decode_message(data, expect_kind="model", expect_job=JOB, limits=FrameLimits())
    assert isinstance(message, ModelMessage)
    for name, array in MODEL.items():
        np.testing.assert_array_equal(message.arrays[name], array)
    # Published again (a restart): the same name, nothing new.
    assert publisher.write_model(4, MODEL, saved) == broadcast


def test_where_links_are_refused_the_model_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, publisher, layout = _saved(tmp_path)
    saved = store.saved(3, MODEL)

    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    broadcast = publisher.write_model(4, MODEL, saved)
    published = layout.aggregator_dir / broadcast.ref.path
    assert not broadcast.linked and published.stat().st_ino != store.path_for(3).stat().st_ino
    assert publisher.bytes_written > 0
    assert broadcast.ref.sha256 == hashlib.sha256(published.read_bytes()).hexdigest()


def test_a_model_too_big_for_one_file_is_written_in_parts_not_linked(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state", JOB)
    big = {"w": np.zeros(2_000_000, np.float32)}  # 8 MB, over a 1 MiB part size
    store.save(1, big)
    publisher = Publisher(JobLayout(tmp_path / "root", JOB, AGG), (SITE,), part_bytes=1024 * 1024)
    broadcast = publisher.write_model(2, big, store.saved(1, big))
    assert not broadcast.linked and broadcast.ref.parts > 1


def test_a_file_that_no_longer_holds_the_model_is_not_offered(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state", JOB)
    store.save(1, MODEL)
    other = {"w": np.zeros((3, 5), np.float32), "b": np.ones(4, np.float64)}
    assert store.saved(1, other) is None  # another size: not this model
    assert store.saved(2, MODEL) is None  # no file for that round


def test_after_a_restart_the_file_is_checked_before_it_is_offered(tmp_path: Path) -> None:
    ModelStore(tmp_path / "state", JOB).save(1, MODEL)
    fresh = ModelStore(tmp_path / "state", JOB)  # a new process: nothing cached
    assert fresh.saved(1, MODEL) is not None
    same_size = {"w": MODEL["w"] + 1, "b": MODEL["b"]}
    assert fresh.saved(1, same_size) is None  # same size, other bytes: never linked
