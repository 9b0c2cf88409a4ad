"""Models and results over a file-size cap travel as parts, and arrive whole."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_daemon import run_federation, scripted_train

from fl_orchestrator.config import load_config
from fl_orchestrator.core.reasons import Reason, Rejection
from fl_orchestrator.daemon.lifecycle import EXIT_DONE
from fl_orchestrator.datasite.runner import DatasiteRunner, RunnerSettings
from fl_orchestrator.wire.parts import assemble, part_name, split_frames, whole_name

from support import scripted
from support.jobs import AGGREGATOR, job_table, write_job

PART_BYTES = 64


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6), st.integers(1, 100))
def test_split_then_assemble_is_the_identity(frames: list[bytes], part_bytes: int) -> None:
    import hashlib

    whole = b"".join(frames)
    parts = split_frames(frames, part_bytes)
    sizes = [sum(c.nbytes for c in chunks) for chunks in parts]
    assert all(size <= part_bytes for size in sizes)
    assert all(size == part_bytes for size in sizes[:-1])
    if whole:
        joined = assemble(
            [b"".join(bytes(c) for c in chunks) for chunks in parts],
            len(whole),
            hashlib.sha256(whole).hexdigest(),
        )
        assert bytes(joined) == whole


def test_a_missing_or_changed_part_means_not_yet() -> None:
    import hashlib

    data = b"x" * 100
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(Rejection) as short:
        assemble([data[:50]], 100, sha)
    assert short.value.reason == Reason.TRUNCATED
    with pytest.raises(Rejection) as wrong:
        assemble([data[:50], b"y" * 50], 100, sha)
    assert wrong.value.reason == Reason.TRUNCATED


def test_part_names() -> None:
    assert part_name("abc.result", 3) == "abc.result.part-0003"
    assert whole_name("abc.result.part-0003") == "abc.result"
    assert whole_name("abc.result") is None and whole_name(".part-0001") is None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian"])
async def test_a_job_whose_files_exceed_the_cap_runs_on_parts(tmp_path: Path, strategy: str) -> None:
    table = job_table(
        3,
        job={"num_rounds": 2, "min_train_nodes": 3},
        syftbox={"part_bytes": PART_BYTES},
        strategy={"name": strategy},
    )
    job = write_job(tmp_path, table)
    config = load_config(job)
    trains = [scripted_train(i) for i in range(3)]
    daemon = await run_federation(job, trains, part_bytes=PART_BYTES)
    assert daemon.exit_code == EXIT_DONE
    # Nothing over the cap was written into the synced tree.
    synced = [p for p in config.syftbox.root.rglob("*") if p.is_file() and not p.name.endswith(".yaml")]
    assert synced and max(p.stat().st_size for p in synced) <= max(PART_BYTES, 512)
    assert any(".part-" in p.name for p in daemon.layout.models_dir.iterdir())
    assert any(".result.part-" in p.name for p in daemon.layout.results_dir("ds0@example.org").iterdir())
    expected: Any = daemon.store.load(0)
    from fl_orchestrator.aggregation.registry import build_strategy

    for rnd in (1, 2):
        updates = [scripted.scripted_update(expected, i) for i in range(3)]
        counts = [scripted.num_examples_of(i) for i in range(3)]
        built = build_strategy(strategy)
        built.begin_round(rnd, expected)
        if built.streaming:
            for update, n in zip(updates, counts, strict=True):
                built.fold(update, n)
        else:
            built.aggregate_all(updates, counts)
        expected = built.finish()
        got = daemon.store.load(rnd)
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-6)
    assert daemon.quarantine.counts == {}


def test_a_result_whose_last_part_syncs_late_is_taken_when_it_arrives(tmp_path: Path) -> None:
    from fl_orchestrator.config.schema import LimitsSection
    from fl_orchestrator.core import events as ev
    from fl_orchestrator.intake.loop import IntakeLoop
    from fl_orchestrator.intake.quarantine import Quarantine
    from fl_orchestrator.intake.reader import InboundReader
    from fl_orchestrator.protocols.native import NativeWire
    from fl_orchestrator.wire.layout import JobLayout
    from fl_orchestrator.wire.messages import Envelope, ResultMessage, model_spec

    model = {"w": np.arange(40, dtype=np.float32)}
    layout = JobLayout(tmp_path / "root", "job", AGGREGATOR)
    reader = InboundReader(layout, frozenset({"ds0@example.org"}), model_spec(model), LimitsSection())
    loop = IntakeLoop(
        NativeWire(layout),
        reader,
        Quarantine(tmp_path / "q", keep_originals=True),
        time.time,
        settle_seconds=5,
    )
    settings_ = RunnerSettings(
        root=layout.root,
        email="ds0@example.org",
        aggregator=AGGREGATOR,
        job="job",
        train="x:y",
        part_bytes=PART_BYTES,
    )
    runner = DatasiteRunner(settings_, train=scripted_train(0))
    path = layout.result_path("ds0@example.org", "t1")
    path.parent.mkdir(parents=True)
    result = ResultMessage(Envelope("job", 1, "m1", "t1", 0.0, None), True, 5, {}, arrays=model)
    from fl_orchestrator.wire.messages import encode_result_frames

    runner._write_result(path, result, encode_result_frames(result))
    parts = sorted(path.parent.glob("t1.result.part-*"))
    assert len(parts) > 2
    held = parts[-1].read_bytes()
    parts[-1].unlink()  # the sync has not brought the last part yet
    assert anyio.run(loop.take, path) == []
    assert loop.quarantine.counts == {}
    parts[-1].write_bytes(held)
    [event] = anyio.run(loop.take, parts[-1])  # the part's own event leads to its result
    assert isinstance(event, ev.ResultReceived) and event.num_examples == 5


def _parted_scene(tmp_path: Path, settle: float) -> tuple[Any, Path, list[Path], list[bytes]]:
    from fl_orchestrator.config.schema import LimitsSection
    from fl_orchestrator.intake.loop import IntakeLoop
    from fl_orchestrator.intake.quarantine import Quarantine
    from fl_orchestrator.intake.reader import InboundReader
    from fl_orchestrator.protocols.native import NativeWire
    from fl_orchestrator.wire.layout import JobLayout
    from fl_orchestrator.wire.messages import Envelope, ResultMessage, encode_result_frames, model_spec

    model = {"w": np.arange(40, dtype=np.float32)}
    layout = JobLayout(tmp_path / "root", "job", AGGREGATOR)
    reader = InboundReader(layout, frozenset({"ds0@example.org"}), model_spec(model), LimitsSection())
    loop = IntakeLoop(
        NativeWire(layout),
        reader,
        Quarantine(tmp_path / "q", keep_originals=True),
        time.time,
        settle_seconds=settle,
    )
    settings_ = RunnerSettings(
        root=layout.root,
        email="ds0@example.org",
        aggregator=AGGREGATOR,
        job="job",
        train="x:y",
        part_bytes=PART_BYTES,
    )
    path = layout.result_path("ds0@example.org", "t1")
    path.parent.mkdir(parents=True)
    result = ResultMessage(Envelope("job", 1, "m1", "t1", 0.0, None), True, 5, {}, arrays=model)
    DatasiteRunner(settings_, train=scripted_train(0))._write_result(
        path, result, encode_result_frames(result)
    )
    parts = sorted(path.parent.glob("t1.result.part-*"))
    held = [p.read_bytes() for p in parts]
    for part in parts[1:]:
        part.unlink()  # only the first part has synced so far
    return loop, path, parts, held


def test_parts_arriving_slowly_restart_the_settle_time_and_a_refused_result_is_read_again(
    tmp_path: Path,
) -> None:
    from fl_orchestrator.core import events as ev

    loop, path, parts, held = _parted_scene(tmp_path, settle=0.2)
    assert anyio.run(loop.take, path) == []
    for part, data in zip(parts[1:-1], held[1:-1], strict=True):
        time.sleep(0.15)
        part.write_bytes(data)  # each arrival is progress: no refusal yet
        assert anyio.run(loop.take, part) == []
    assert loop.quarantine.counts == {}
    time.sleep(0.3)
    assert anyio.run(loop.take, path) == []
    assert loop.quarantine.counts == {"ds0@example.org": {"truncated": 1}}  # settled while incomplete
    parts[-1].write_bytes(held[-1])  # ...and then the last part still comes
    [event] = anyio.run(loop.take, parts[-1])
    assert isinstance(event, ev.ResultReceived) and event.num_examples == 5


def test_a_partial_file_that_disappears_is_forgotten(tmp_path: Path) -> None:
    loop, path, parts, _ = _parted_scene(tmp_path, settle=5.0)
    assert anyio.run(loop.take, path) == [] and path in loop.unsettled
    path.unlink()
    for part in parts[:1]:
        part.unlink()
    assert anyio.run(loop.take, path) == []
    assert loop.unsettled == {}
