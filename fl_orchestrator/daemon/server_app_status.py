"""status.json for `fl-orchestratord --server-app`: what a custom loop sent and got back, per owner.

A custom loop has no rounds of ours, so the document has ``phase = "custom_loop"``
and no round numbers; each owner's ``selected`` / ``succeeded`` / ``failed``
count the requests the ServerApp sent it and the replies (good or Flower
errors) it took. It is read by ``fl-orchestrator status --state-dir DIR``
like any job's, and rewritten atomically at most once a second while things
change, and once at the end.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

from fl_orchestrator.daemon.reports import STATUS_FILE, process_start_ticks
from fl_orchestrator.storage.atomic import atomic_write_text
from fl_orchestrator.storage.jsonl import json_text

PHASE = "custom_loop"
_AT_MOST_EVERY_SECONDS = 1.0


class ServerAppStatus:
    """The custom loop's status document, and its writer."""

    def __init__(self, state_dir: Path, app_name: str, run_id: int, owners: list[str]) -> None:
        self.path = state_dir / STATUS_FILE
        self.app_name = app_name
        self.run_id = run_id
        self.owners = list(owners)
        self.last_seen: dict[str, float] = {}
        self.state = "running"
        self.error: str | None = None
        self._pid = os.getpid()
        self._host = socket.gethostname()
        self._ticks = process_start_ticks(self._pid)
        self._changed = anyio.Event()

    def seen(self, owner: str, at: float | None = None) -> None:
        """The owner is present (its handler is up, or it answered)."""
        self.last_seen[owner] = time.time() if at is None else at
        self.changed()

    def changed(self) -> None:
        """Something shown changed: the writer rewrites the file soon."""
        self._changed.set()

    def document(self, counts: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
        """The status.json object (the keys `fl-orchestrator status` reads)."""
        # The grid adds to these in the ServerApp's thread; one owner's dict is copied at a time.
        per_owner = {owner: dict(counts.get(owner, {})) for owner in self.owners}
        datasites = {
            owner: {
                "last_seen": self.last_seen.get(owner),
                "selected": numbers.get("sent", 0),
                "succeeded": numbers.get("answered", 0),
                "failed": numbers.get("failed", 0),
                "timed_out": 0,
                "rejected": 0,
            }
            for owner, numbers in per_owner.items()
        }
        document: dict[str, Any] = {
            "job": self.app_name,
            "run_id": str(self.run_id),
            "mode": "server_app",
            "state": self.state,
            "phase": PHASE if self.state == "running" else self.state,
            "round": None,
            "num_rounds": None,
            "updated": time.time(),
            "pid": self._pid,
            "pid_start_ticks": self._ticks,
            "host": self._host,
            "datasites": datasites,
        }
        if self.error:
            document["error"] = self.error
        return document

    def write(self, counts: Mapping[str, Mapping[str, int]]) -> None:
        """Write the document now (atomically; in a worker thread)."""
        atomic_write_text(self.path, json_text(self.document(counts), sort_keys=True), durable=False)

    async def write_when_changed(self, counts: Mapping[str, Mapping[str, int]]) -> None:
        """Rewrite on change, at most once a second, until cancelled."""
        while True:
            await self._changed.wait()
            self._changed = anyio.Event()
            await anyio.to_thread.run_sync(self.write, counts)
            await anyio.sleep(_AT_MOST_EVERY_SECONDS)
