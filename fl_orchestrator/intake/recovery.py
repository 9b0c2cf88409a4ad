"""After a restart: read a counted result again, and make sure it is still the bytes validated.

The round log holds each counted result's path, file identity and the
sha256 of its validated bytes. The kept link (storage/kept.py) is tried first,
then the datasite's own file. Either must hash to the recorded sha256; a
kept link that does not (the file was rewritten in place) is dropped, so the
datasite's next answer is not refused as a second link.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from fl_orchestrator.core.reasons import Rejection
from fl_orchestrator.intake.reader import InboundReader
from fl_orchestrator.storage.kept import KeptResults
from fl_orchestrator.storage.round_log import ResultRecord
from fl_orchestrator.wire.messages import ResultMessage
from fl_orchestrator.wire.parts import PART_SUFFIX


def recover_counted(
    reader: InboundReader, kept: KeptResults, rnd: int, record: ResultRecord
) -> ResultMessage | str:
    """The counted result as validated, or why it cannot be had any more."""
    original = Path(record.path)
    try:
        kept_path = kept.path_for(rnd, original)
    except ValueError:
        return f"{original} is not under the datasites folder"
    problems: list[str] = []
    for root, path in ((kept.root(rnd), kept_path), (reader.layout.datasites_dir, original)):
        if not os.path.lexists(path):
            problems.append(f"{path}: missing")
            continue
        try:
            return reader.read_counted(root, path, record.sha256, record.reply_to)
        except Rejection as exc:
            problems.append(f"{path}: {exc.reason}: {exc.detail}")
            if path == kept_path:
                _drop_link(kept_path)
    return "; ".join(problems)


def _drop_link(path: Path) -> None:
    """Remove a kept link and its parts (result names are letters and digits: glob-safe)."""
    for entry in [path, *path.parent.glob(f"{path.name}{PART_SUFFIX}*")]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry)
