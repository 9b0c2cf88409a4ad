"""What the round loop's shell asks of a protocol's writing side: prepare, a model, tasks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fl_orchestrator.storage.models import SavedModel
from fl_orchestrator.wire.messages import ModelRef


@dataclass(frozen=True)
class Broadcast:
    """A round's model as written for the datasites."""

    round: int
    ref: ModelRef
    nbytes: int
    # A link to the state folder's copy: no bytes were written for it.
    linked: bool = False


class Publisher(Protocol):
    """Writes what the aggregator sends: the round's model and one task per selected datasite."""

    @property
    def models_dir(self) -> Path:
        """Where models are written (named in logs when a write fails)."""
        ...

    @property
    def tasks_dir(self) -> Path:
        """Where tasks are written (named in logs when a write fails)."""
        ...

    def prepare(self) -> list[Path]:
        """Before the first round: folders and permissions; return our leftover temp files removed."""
        ...

    def write_model(
        self, rnd: int, model: Mapping[str, np.ndarray], saved: SavedModel | None = None
    ) -> Broadcast:
        """Make round rnd's model available to the datasites.

        ``saved`` is the state folder's file holding this very model: a publisher that puts the
        model in a file may link that one instead of writing the bytes a second time.
        """
        ...

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
        """Send one task per datasite in ``tasks`` (datasite -> task id); return the bytes written."""
        ...
