"""Quarantine: refused files are moved out of the way, with their reason beside them."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from fl_orchestrator.shell.atomic import atomic_write_text
from fl_orchestrator.wire.reasons import Reason

log = structlog.get_logger("fl_orchestrator.quarantine")


@dataclass
class Quarantine:
    """state_dir/quarantine/<datasite>/<stamp>-<reason>-<name> plus a .reason.json."""

    directory: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def refuse(
        self, path: Path, datasite: str, reason: Reason, detail: str, **context: object
    ) -> Path | None:
        """Log, count and move one refused file; return where it went (None if not moved)."""
        per_site = self.counts.setdefault(datasite, {})
        per_site[str(reason)] = per_site.get(str(reason), 0) + 1
        safe_site = datasite.replace("/", "_").replace("..", "_") or "_"
        target_dir = self.directory / safe_site
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = target_dir / f"{stamp}-{reason}-{path.name}"
        moved: Path | None = None
        move_error = None
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(path):
                try:
                    os.replace(path, target)
                except OSError:
                    if os.path.islink(path) or not os.path.isfile(path):
                        raise
                    shutil.move(str(path), str(target))
                moved = target
        except OSError as exc:
            move_error = exc.strerror or str(exc)
        record = {
            "source": str(path),
            "datasite": datasite,
            "reason": str(reason),
            "detail": detail,
            "moved_to": str(moved) if moved else None,
            "move_error": move_error,
            "at": time.time(),
        }
        try:
            atomic_write_text(
                target_dir / f"{stamp}-{reason}-{path.name}.reason.json",
                json.dumps(record, sort_keys=True),
                durable=False,
            )
        except OSError as exc:
            move_error = move_error or f"record not written: {exc.strerror}"
        log.warning(
            "file.rejected",
            datasite=datasite,
            reason=str(reason),
            detail=detail,
            path=str(path),
            quarantined_to=str(moved) if moved else None,
            move_error=move_error,
            **context,
        )
        return moved
