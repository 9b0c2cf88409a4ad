"""The round's model as a datasite reads it: whole or in parts, checked against the task's sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fl_orchestrator.core.reasons import Rejection
from fl_orchestrator.wire.messages import ModelRef
from fl_orchestrator.wire.parts import assemble, part_name


class ModelNotReady(Exception):
    """The task's model has not (fully) arrived yet: try again on the next event or rescan."""


class ModelUnusable(Exception):
    """The task's model arrived but can never be used."""


def read_model_bytes(path: Path, ref: ModelRef) -> bytes | memoryview:
    """The model file, or its parts joined; ModelNotReady until all of it has arrived."""
    if not ref.parts:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ModelNotReady(f"{path.name} has not arrived") from None
        if size != ref.nbytes:
            raise ModelNotReady(f"{path.name} has {size} of {ref.nbytes} bytes")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ModelNotReady(f"{path.name} does not match its sha256 yet")
        return data
    paths = [path.with_name(part_name(path.name, index)) for index in range(ref.parts)]
    total = 0
    for index, part in enumerate(paths):
        try:
            total += part.stat().st_size  # stat all first: no reads until every part is there
        except FileNotFoundError:
            raise ModelNotReady(f"part {index} of {ref.parts} of {path.name} has not arrived") from None
    if total != ref.nbytes:
        raise ModelNotReady(f"the parts of {path.name} hold {total} of {ref.nbytes} bytes")
    chunks = [part.read_bytes() for part in paths]
    try:
        return assemble(chunks, ref.nbytes, ref.sha256)
    except Rejection as exc:
        raise ModelNotReady(f"{path.name}: {exc.detail}") from None
