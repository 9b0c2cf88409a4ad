"""Writes the aggregator's side of the protocol: permissions, models and tasks."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fl_orchestrator.protocols.contract import Broadcast
from fl_orchestrator.storage.atomic import (
    atomic_write,
    atomic_write_text,
    fsync_dir,
    remove_own_temps,
    write_durably,
)
from fl_orchestrator.storage.models import SavedModel, model_message
from fl_orchestrator.wire.layout import JobLayout
from fl_orchestrator.wire.messages import (
    Envelope,
    ModelRef,
    TaskMessage,
    encode_model_frames,
    encode_task,
    sha256_of_frames,
)
from fl_orchestrator.wire.parts import part_name, split_frames
from fl_orchestrator.wire.permissions import aggregator_permissions


class Publisher:
    """Everything the aggregator writes into its own datasite."""

    def __init__(self, layout: JobLayout, datasites: tuple[str, ...], part_bytes: int = 0) -> None:
        self.layout = layout
        self.datasites = datasites
        self.part_bytes = part_bytes
        self.bytes_written = 0

    @property
    def models_dir(self) -> Path:
        """Where the round's models are written."""
        return self.layout.models_dir

    @property
    def tasks_dir(self) -> Path:
        """The aggregator's job folder, which holds every datasite's tasks."""
        return self.layout.aggregator_dir

    def prepare(self) -> list[Path]:
        """Remove our temp files a kill left behind, then make the folder and grant reads."""
        # A kill -9 mid-write leaves our temp files in the synced folder, where every
        # datasite's client would sync them.
        leftovers = remove_own_temps(self.layout.aggregator_dir, recursive=True)
        self.layout.aggregator_dir.mkdir(parents=True, exist_ok=True)
        self.write_permissions()
        return leftovers

    def announce_end(self, run_id: str, outcome: str, reason: str | None) -> None:
        """Tell every datasite the job has ended (their runners exit): one marker in each task folder."""
        text = json.dumps({"job": self.layout.job, "run": run_id, "outcome": outcome, "reason": reason})
        for datasite in self.datasites:
            path = self.layout.job_ended_path(datasite)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text + "\n")

    def withdraw_end(self) -> None:
        """A run is under way: no marker of an earlier run may stop a datasite."""
        for datasite in self.datasites:
            self.layout.job_ended_path(datasite).unlink(missing_ok=True)

    def write_permissions(self) -> None:
        """Grant the datasites read access to models and to their own tasks."""
        for name, text in aggregator_permissions(self.datasites).items():
            path = self.layout.aggregator_dir / name
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                self.bytes_written += atomic_write_text(path, text)

    def write_model(
        self, rnd: int, model: Mapping[str, np.ndarray], saved: SavedModel | None = None
    ) -> Broadcast:
        """Write round rnd's model once, named by its content hash; reuse it if present.

        With ``saved`` (the state folder's file of this model) and no parts needed, the broadcast
        is a hard link to it: the model's bytes are written once a round, not twice. Its envelope
        then carries the round the model came out of; datasites check the job and the sha256,
        never that round. Across filesystems, or where links are refused, it is written.
        """
        if saved is not None and not 0 < self.part_bytes < saved.nbytes:
            linked = self._link_model(rnd, saved)
            if linked is not None:
                return linked
        frames = encode_model_frames(model_message(self.layout.job, rnd, model, f"g{rnd}"))
        nbytes = sum(memoryview(f).nbytes for f in frames)
        if 0 < self.part_bytes < nbytes:
            return self._write_model_parts(rnd, frames, nbytes)
        # The name needs the hash, the write does not: hash in a second thread
        # while this one writes and fsyncs under a temp name (both drop the GIL).
        with ThreadPoolExecutor(max_workers=1) as pool:
            hashing = pool.submit(sha256_of_frames, frames)
            temp = self.layout.models_dir / f".incoming-r{rnd:05d}.{secrets.token_hex(6)}.tmp"
            written = write_durably(temp, frames)
            sha = hashing.result()
        path = self.layout.models_dir / self.layout.model_name(rnd, sha)
        if path.exists() and path.stat().st_size == nbytes:
            temp.unlink()
        else:
            os.replace(temp, path)
            fsync_dir(path.parent)
            self.bytes_written += written
        relative = path.relative_to(self.layout.aggregator_dir).as_posix()
        return Broadcast(rnd, ModelRef(relative, sha, nbytes), nbytes)

    def _link_model(self, rnd: int, saved: SavedModel) -> Broadcast | None:
        path = self.layout.models_dir / self.layout.model_name(rnd, saved.sha256)
        relative = path.relative_to(self.layout.aggregator_dir).as_posix()
        broadcast = Broadcast(rnd, ModelRef(relative, saved.sha256, saved.nbytes), saved.nbytes, linked=True)
        if path.exists() and path.stat().st_size == saved.nbytes:
            return broadcast
        temp = self.layout.models_dir / f".incoming-r{rnd:05d}.{secrets.token_hex(6)}.tmp"
        try:
            self.layout.models_dir.mkdir(parents=True, exist_ok=True)
            os.link(saved.path, temp)
        except OSError:
            return None  # another filesystem, or no links here: write the bytes instead
        os.replace(temp, path)
        fsync_dir(path.parent)
        return broadcast

    def _write_model_parts(self, rnd: int, frames: list[Any], nbytes: int) -> Broadcast:
        """Too large for the sync's file cap: write parts named by the whole model's hash."""
        sha = sha256_of_frames(frames)
        name = self.layout.model_name(rnd, sha)
        parts = split_frames(frames, self.part_bytes)
        for index, chunks in enumerate(parts):
            path = self.layout.models_dir / part_name(name, index)
            size = sum(c.nbytes for c in chunks)
            if not (path.exists() and path.stat().st_size == size):
                self.bytes_written += atomic_write(path, chunks)
        relative = (self.layout.models_dir / name).relative_to(self.layout.aggregator_dir).as_posix()
        return Broadcast(rnd, ModelRef(relative, sha, nbytes, len(parts)), nbytes)

    def write_tasks(
        self,
        broadcast: Broadcast,
        tasks: Mapping[str, str],
        *,
        attempt: int,
        deadline: float,
        config: Mapping[str, Any],
        action: str = "train",
        rnd: int | None = None,
    ) -> int:
        """Write one small task per selected datasite; return the bytes written."""
        total = 0
        now = time.time()
        for datasite, task_id in tasks.items():
            message = TaskMessage(
                Envelope(
                    self.layout.job, broadcast.round if rnd is None else rnd, task_id, None, now, deadline
                ),
                attempt,
                broadcast.ref,
                dict(config),
                action,
            )
            # Tasks are rebuilt from the round log after a crash (same ids, same
            # model), so losing one from the page cache costs nothing: no fsync each.
            total += atomic_write(
                self.layout.task_path(datasite, task_id), [encode_task(message)], durable=False
            )
        self.bytes_written += total
        return total
