"""The one seam between the intake and a wire protocol.

The watcher, the intake loop, the quarantine and the validator are the same
for every protocol. A protocol is an adapter that says:

- which folders lead to each datasite's files, and which paths are its
  results and its presence (``folders_on_the_way``, ``scan``, ``classify``);
- how a file's bytes become a typed result, a presence or a refusal
  (``read``, in a worker thread; every result's arrays then pass the shared
  validator, ``InboundReader.check_arrays``);
- what to keep of a counted result for a restart (``keep``), and what to do
  once the round loop has decided about one (``decided``).

The native msgpack protocol (protocols/native/) and syft-flwr
(protocols/syft_flwr/) are the two adapters; tests add their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fl_orchestrator.core import events as ev
from fl_orchestrator.intake.reader import Inbound, InboundReader, Refused, ResultHandle
from fl_orchestrator.intake.safe_read import FileIdentity
from fl_orchestrator.storage.kept import KeptResults
from fl_orchestrator.wire.layout import Classified
from fl_orchestrator.wire.messages import HeartbeatMessage, split_runner_seconds


@dataclass(frozen=True)
class Settled:
    """A file the protocol dealt with itself (an acknowledgement, a resend): nothing to count."""

    path: Path
    identity: FileIdentity | None
    detail: str


Outcome = Inbound | Refused | Settled


class WatchedTree(Protocol):
    """What the watcher needs to know of a protocol: where its files are."""

    @property
    def datasites_dir(self) -> Path:
        """The folder that holds every datasite."""
        ...

    @property
    def marker(self) -> str:
        """A substring of every path of this protocol's files (the watch filter)."""
        ...

    @property
    def aggregator(self) -> str:
        """This aggregator's own email: its folder is no stranger's."""
        ...

    def folders_on_the_way(self, datasite: str) -> list[Path]:
        """The folders from datasites/<email> down to the one holding its results, in order."""
        ...

    def scan(self, datasites: tuple[str, ...]) -> Iterator[Path]:
        """Every presence and result file present now (the rescan)."""
        ...


class WireAdapter(WatchedTree, Protocol):
    """A wire protocol as the intake and the round loop's shell see it."""

    def classify(self, path: Path) -> Classified | None:
        """What a path is (None: not this protocol's; IGNORED: a write under way)."""
        ...

    def look_at(self, path: Path) -> Path:
        """The path to read when ``path`` changed (a part names the result it belongs to)."""
        ...

    def parts_signature(self, path: Path) -> tuple[tuple[str, int, int], ...]:
        """What else a result is made of (its parts), so a new part makes it worth reading again."""
        ...

    def read(self, path: Path, classified: Classified, reader: InboundReader) -> Outcome:
        """Read, decode and validate (with ``reader``) one file; never raises for its content."""
        ...

    def keep(self, kept: KeptResults, rnd: int, handle: ResultHandle) -> bool:
        """Keep a counted result where a restart can read it again; say if kept."""
        ...

    def decided(self, handle: ResultHandle) -> None:
        """The round loop has counted or refused this result (in a worker thread)."""
        ...


def event_of(inbound: Inbound, now: float) -> ev.Event:
    """The machine's view of a decoded file, read at ``now``."""
    message = inbound.message
    if isinstance(message, HeartbeatMessage):
        # The file's mtime, not the moment we read it: a heartbeat left behind
        # by a datasite that died before our restart must not count as fresh.
        return ev.NodeSeen(now, inbound.datasite, seen_at=inbound.identity.mtime_ns / 1e9)
    env = message.envelope
    metrics, runner_seconds = split_runner_seconds(message.metrics)
    return ev.ResultReceived(
        now=now,
        datasite=inbound.datasite,
        round=env.round,
        reply_to=env.reply_to,
        ok=message.ok,
        num_examples=message.num_examples,
        metrics=metrics,
        error_type=message.error_type,
        error_message=message.error_message,
        payload=ResultHandle(inbound.path, inbound.identity, inbound.sha256, message),
        purpose=message.action,
        update_norm=inbound.update_norm,
        runner_seconds=runner_seconds,
    )


def presence_first(events: list[ev.Event]) -> list[ev.Event]:
    """The heartbeats read in one hop as one event, ahead of the rest (see ``NodesSeen``)."""
    seen = [e for e in events if isinstance(e, ev.NodeSeen)]
    if len(seen) < 2:
        return events
    rest = [e for e in events if not isinstance(e, ev.NodeSeen)]
    return [ev.NodesSeen(max(e.now for e in seen), tuple(seen)), *rest]
