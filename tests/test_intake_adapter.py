"""The one intake over a third protocol, made up here: nothing in intake/ knows native or syft-flwr.

``TextWire`` puts each datasite's files in ``datasites/<email>/text/``:
``hello`` (presence), ``<task>.txt`` results (``"<num_examples> <w values...>"``),
``ack-*.txt`` (handled by the adapter itself) and ``bad-*.txt`` (a failure that
is also quarantined). The watcher, the loop, the shared validator and the
quarantine run unchanged over it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest

from fl_orchestrator.config.schema import LimitsSection
from fl_orchestrator.core import events as ev
from fl_orchestrator.core.reasons import Reason, Rejection
from fl_orchestrator.intake.adapter import Outcome, Settled, WireAdapter
from fl_orchestrator.intake.loop import IntakeLoop
from fl_orchestrator.intake.quarantine import Quarantine
from fl_orchestrator.intake.reader import Inbound, InboundReader, Refused, ResultHandle
from fl_orchestrator.intake.safe_read import FileIdentity
from fl_orchestrator.intake.watcher import PathBatch, watch_job_files
from fl_orchestrator.storage.kept import KeptResults
from fl_orchestrator.wire.layout import Classified, FileKind, JobLayout
from fl_orchestrator.wire.messages import Envelope, HeartbeatMessage, ResultMessage, model_spec

pytestmark = pytest.mark.anyio
SITE = "ds0@example.org"
MODEL = {"w": np.zeros(3, dtype=np.float32)}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class TextWire:
    """A protocol of plain text files, enough to show the seam."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.decided_paths: list[Path] = []
        self.settled: list[Path] = []

    @property
    def datasites_dir(self) -> Path:
        return self.root / "datasites"

    @property
    def aggregator(self) -> str:
        return "agg@example.org"

    @property
    def marker(self) -> str:
        return os.sep + "text" + os.sep

    def folders_on_the_way(self, datasite: str) -> list[Path]:
        return [self.datasites_dir / datasite, self.datasites_dir / datasite / "text"]

    def scan(self, datasites: tuple[str, ...]) -> Iterator[Path]:
        for datasite in datasites:
            folder = self.datasites_dir / datasite / "text"
            if folder.is_dir():
                yield from sorted(folder.iterdir())

    def classify(self, path: Path) -> Classified | None:
        parts = path.relative_to(self.datasites_dir).parts
        if len(parts) != 3 or parts[1] != "text":
            return None
        if parts[2] == "hello":
            return Classified(parts[0], FileKind.HEARTBEAT)
        if parts[2].endswith(".txt"):
            return Classified(parts[0], FileKind.RESULT)
        return Classified(parts[0], FileKind.IGNORED)

    def look_at(self, path: Path) -> Path:
        return path

    def parts_signature(self, path: Path) -> tuple[tuple[str, int, int], ...]:
        return ()

    def read(self, path: Path, classified: Classified, reader: InboundReader) -> Outcome:
        info = os.lstat(path)
        identity = FileIdentity(info.st_ino, info.st_size, info.st_mtime_ns)
        owner = classified.datasite
        if classified.kind == FileKind.HEARTBEAT:
            beat = HeartbeatMessage(Envelope("job", 0, "", None, info.st_mtime, None), "idle")
            return Inbound(path, owner, identity, beat)
        name = path.name.removesuffix(".txt")
        if name.startswith("ack-"):
            self.settled.append(path)
            return Settled(path, identity, "an acknowledgement")
        if name.startswith("bad-"):
            failure = ResultMessage(Envelope("job", 1, "m", name[4:], 0.0, None), False, 0, {}, "Bad", "no")
            return Inbound(path, owner, identity, failure, refusal=(Reason.MALFORMED, "unusable"), alive=True)
        words = path.read_text().split()
        if not words:
            return Refused(path, owner, Reason.EMPTY_FILE, "nothing yet", identity)
        arrays = {"w": np.array([float(x) for x in words[1:]], dtype=np.float32)}
        result = ResultMessage(
            Envelope("job", 1, "m", name, 0.0, None), True, int(words[0]), {}, arrays=arrays
        )
        try:
            checked, norm, clipped = reader.check_arrays(result)  # the one validator
        except Rejection as exc:
            return Refused(path, owner, exc.reason, exc.detail, identity)
        return Inbound(path, owner, identity, checked, norm, clipped, alive=True)

    def keep(self, kept: KeptResults, rnd: int, handle: ResultHandle) -> bool:
        return False

    def decided(self, handle: ResultHandle) -> None:
        self.decided_paths.append(handle.path)


def scene(tmp_path: Path, settle: float = 5.0) -> tuple[TextWire, IntakeLoop, Path]:
    wire = TextWire(tmp_path / "box")
    layout = JobLayout(tmp_path / "box", "job", "agg@example.org")
    reader = InboundReader(layout, frozenset({SITE}), model_spec(MODEL), LimitsSection())
    quarantine = Quarantine(tmp_path / "quarantine", keep_originals=True)
    folder = wire.datasites_dir / SITE / "text"
    folder.mkdir(parents=True)
    adapter: WireAdapter = wire  # the protocol is all it needs to be
    return wire, IntakeLoop(adapter, reader, quarantine, time.time, settle_seconds=settle), folder


async def test_presence_results_and_refusals_come_through_the_shared_loop(tmp_path: Path) -> None:
    wire, loop, folder = scene(tmp_path)
    (folder / "hello").write_text("hi")
    (folder / "t1.txt").write_text("7 1 2 3")
    (folder / "t2.txt").write_text("7 1 2")  # one value short: the shared validator refuses it
    (folder / "ack-1.txt").write_text("")
    (folder / "bad-t3.txt").write_text("?")
    [seen] = await loop.take(folder / "hello")
    assert isinstance(seen, ev.NodeSeen) and seen.datasite == SITE
    alive, result = await loop.take(folder / "t1.txt")
    assert isinstance(alive, ev.NodeSeen)
    assert isinstance(result, ev.ResultReceived) and result.ok and result.num_examples == 7
    assert result.reply_to == "t1" and result.payload.message.arrays["w"].tolist() == [1, 2, 3]
    assert await loop.take(folder / "t2.txt") == []
    assert await loop.take(folder / "ack-1.txt") == [] and wire.settled == [folder / "ack-1.txt"]
    _, failure = await loop.take(folder / "bad-t3.txt")
    assert isinstance(failure, ev.ResultReceived) and not failure.ok and failure.reply_to == "t3"
    assert loop.quarantine.counts == {SITE: {"shape_mismatch": 1, "malformed": 1}}
    for path in folder.iterdir():  # seen once each: a rescan finds nothing new
        assert await loop.take(path) == []


async def test_the_shared_watcher_follows_the_adapters_folders(tmp_path: Path) -> None:
    wire, loop, folder = scene(tmp_path)
    batches_send, batches_recv = anyio.create_memory_object_stream[PathBatch](16)
    events_send, events_recv = anyio.create_memory_object_stream[ev.Event](16)
    async with anyio.create_task_group() as group:
        group.start_soon(
            lambda: watch_job_files(
                wire, (SITE,), batches_send, debounce_milliseconds=5, rescan_interval_seconds=3600.0
            )
        )
        group.start_soon(loop.run, batches_recv, events_send)
        await anyio.sleep(0.3)  # the watch is set up
        (folder / "t9.txt").write_text("2 0 0 1")
        with anyio.fail_after(5):
            while not isinstance(event := await events_recv.receive(), ev.ResultReceived):
                pass
        group.cancel_scope.cancel()
    assert isinstance(event, ev.ResultReceived)
    assert event.reply_to == "t9" and event.num_examples == 2


def test_heartbeats_read_in_one_hop_become_one_event_ahead_of_the_results() -> None:
    from fl_orchestrator.intake.adapter import presence_first

    a, b = ev.NodeSeen(1.0, "a@x.org"), ev.NodeSeen(2.0, "b@x.org", seen_at=0.5)
    result = ev.Tick(3.0)  # any other event keeps its place after the presence
    assert presence_first([a, result, b]) == [ev.NodesSeen(2.0, (a, b)), result]
    assert presence_first([a, result]) == [a, result]  # one heartbeat stays as it is
    assert presence_first([]) == []
