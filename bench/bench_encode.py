"""Benchmark 6: writing a round's global model once with ``Publisher.write_model``.

write_model encodes the model message, hashes it (sha256) for its content
name in a second thread while this one writes it durably under a temp name
(write, fsync), then renames it and fsyncs the folder. Baselines, in the same
run and interleaved with it: a raw write of the same bytes to a new file
(``os.write``, no fsync), and the same with one fsync. Each repetition writes a
new round's file; files are deleted between repetitions, outside the timed part.

The parts (encode, sha256, durable atomic write) are timed alone: as sha256
overlaps the write, write_model takes about encode + the longer of the other two.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import GB, Outcome, Row, Sizes, fmt_rate, fmt_seconds, verdict
from simulator import AGGREGATOR, JOB, site_emails, write_frames

from fl_orchestrator.protocols.native import Publisher
from fl_orchestrator.storage.atomic import atomic_write
from fl_orchestrator.storage.models import model_message
from fl_orchestrator.wire.layout import JobLayout
from fl_orchestrator.wire.messages import encode_model_frames, sha256_of_frames

TARGET_GBPS = 1.0


def _raw_write(path: Path, frames: list[Any], *, fsync: bool) -> None:
    write_frames(path, frames)
    if fsync:
        _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run(sizes: Sizes, folder: Path, shared: dict[str, Any]) -> Outcome:
    """Benchmark 6."""
    layout = JobLayout(folder / "syftbox", JOB, AGGREGATOR)
    layout.models_dir.mkdir(parents=True, exist_ok=True)
    publisher = Publisher(layout, tuple(site_emails(2)))
    model = {"w": np.random.default_rng(0).standard_normal(sizes.encode_params, dtype=np.float32)}
    frames = encode_model_frames(model_message(JOB, 1, model, "g1"))
    nbytes = sum(memoryview(f).nbytes for f in frames)
    raw_dir = folder / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[float]] = {}

    def clock(name: str, fn: Any) -> Any:
        os.sync()  # start each timed write with nothing else waiting to be written back
        started = time.perf_counter()
        value = fn()
        series.setdefault(name, []).append(time.perf_counter() - started)
        return value

    for rnd in range(1, sizes.repeats + 2):  # the first repetition only warms up
        clock("raw_write", lambda: _raw_write(raw_dir / "a.bin", frames, fsync=False))
        clock("write_model", lambda r=rnd: publisher.write_model(r, model))
        clock("raw_write_fsync", lambda: _raw_write(raw_dir / "b.bin", frames, fsync=True))
        encoded = clock(
            "encode_frames", lambda r=rnd: encode_model_frames(model_message(JOB, r, model, f"g{r}"))
        )
        clock("sha256", lambda e=encoded: sha256_of_frames(e))
        clock("atomic_write_durable", lambda e=encoded: atomic_write(raw_dir / "c.bin", e))
        clock("atomic_write_no_fsync", lambda e=encoded: atomic_write(raw_dir / "d.bin", e, durable=False))
        shutil.rmtree(layout.models_dir)
        layout.models_dir.mkdir()
        for path in raw_dir.iterdir():
            path.unlink()
    best = {name: min(times[1:]) for name, times in series.items()}
    rate = nbytes / best["write_model"] / GB
    raw_rate = nbytes / best["raw_write"] / GB
    raw_fsync_rate = nbytes / best["raw_write_fsync"] / GB
    sha_alone = nbytes / best["sha256"] / GB
    data: dict[str, Any] = {
        "model_bytes": nbytes,
        "write_model_gbps": rate,
        "baseline_raw_write_gbps": raw_rate,
        "baseline_raw_write_fsync_gbps": raw_fsync_rate,
        "ratio_to_raw_write": rate / raw_rate,
        "ratio_to_raw_write_fsync": rate / raw_fsync_rate,
        "target_gbps": TARGET_GBPS,
        "pass": rate >= TARGET_GBPS,
        "breakdown_best_seconds": best,
        "sha256_gbps": sha_alone,
        "hashlib_backend": hashlib.sha256().name,
        "seconds": series,
    }
    rows = [
        Row(
            "6 encode",
            "Publisher.write_model",
            fmt_rate(rate),
            f"raw write {fmt_rate(raw_rate)}",
            f"{rate / raw_rate:.2f}",
            f">= {TARGET_GBPS:.1f} GB/s",
            verdict(rate >= TARGET_GBPS),
        ),
        Row(
            "6 encode",
            "  vs raw write + fsync",
            fmt_rate(rate),
            fmt_rate(raw_fsync_rate),
            f"{rate / raw_fsync_rate:.2f}",
        ),
    ]
    for part in ("encode_frames", "sha256", "atomic_write_durable", "atomic_write_no_fsync"):
        rows.append(
            Row(
                "6 encode",
                f"  part {part}",
                fmt_seconds(best[part]),
                fmt_seconds(best["write_model"]),
                f"{best[part] / best['write_model']:.2f}",
            )
        )
    return Outcome("ok", data, rows)
