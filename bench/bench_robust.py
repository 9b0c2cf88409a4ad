"""Benchmark 3: robust strategies (median, trimmed mean, Krum) over memmap-backed results.

Each strategy is built with ``fl_orchestrator.aggregation.registry.build_strategy``
and runs in its own process, so its peak RSS (its own VmHWM) is its own.
Its inputs are ``np.memmap`` views over the array payloads of the result files
(what the daemon hands whole-set strategies). Baseline, in the same run:
``np.median`` over the same results stacked into one (N, P) float32 array.

RSS counts the file pages a memmap has touched (RssFile) as well as the
process's own memory (RssAnon); the child samples both, because file pages are
page cache the kernel can drop, while anonymous memory is what can run a
machine out of memory.

Run as ``bench_robust.py --child SPEC.json`` it is the child.
"""

from __future__ import annotations

import argparse
import importlib
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import MIB, Outcome, Row, RssSampler, Sizes, fmt_mib, fmt_seconds, self_peak_rss, verdict

STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")
# Candidate fixes for the mapped pages counted in RSS, run with fedmedian.
CANDIDATES = ("madvise", "pread")
TARGET_PEAK_BYTES = 1024 * MIB


def payload_location(path: Path) -> tuple[int, int]:
    """Offset and length of the first array's bytes in a message file."""
    from fl_orchestrator.wire.frames import FrameLimits, decode_header

    with open(path, "rb") as handle:
        head = handle.read(2 * 1024 * 1024)
    _, offset = decode_header(head, FrameLimits())
    marker = head[offset]
    width = {0xC4: 1, 0xC5: 2, 0xC6: 4}[marker]
    length = int.from_bytes(head[offset + 1 : offset + 1 + width], "big")
    return offset + 1 + width, length


# ---- the child ----------------------------------------------------------------------------


def _memmaps(spec: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    return [
        {"w": np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=(spec["params"],))}
        for path, offset in spec["files"]
    ]


class _PreadUpdate:
    """Candidate fix: an update read with os.pread per chunk, so no file pages are mapped."""

    def __init__(self, path: str, offset: int, params: int) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.offset = offset
        self.params = params

    def read_block(self, name: str, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype="<f4")
        os.preadv(self.fd, [out.view(np.uint8).data], self.offset + 4 * start)
        return out.astype(np.float64)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return (self.params,)


def _pread_updates(spec: dict[str, Any]) -> list[Any]:
    from fl_orchestrator.aggregation.chunks import LazyUpdate

    class PreadUpdate(_PreadUpdate, LazyUpdate):
        def __getitem__(self, name: str) -> np.ndarray:
            return self.read_block(name, 0, self.params)

        def __iter__(self) -> Any:
            return iter(("w",))

        def __len__(self) -> int:
            return 1

    return [PreadUpdate(path, offset, spec["params"]) for path, offset in spec["files"]]


class _MadviseUpdate:
    """Candidate fix: a mapped update whose pages are dropped from this process once read.

    Reads a block from the mapping (as the memmap does), then madvise(MADV_DONTNEED)
    on the whole pages before the block's end: the page cache keeps them, but
    they no longer count in this process's RSS. A later pass from the start
    simply maps them again.
    """

    def __init__(self, path: str, offset: int, params: int) -> None:
        with open(path, "rb") as handle:
            self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.array = np.frombuffer(self.map, dtype="<f4", count=params, offset=offset)
        self.offset = offset
        self.params = params
        self.dropped = 0

    def read_block(self, name: str, start: int, stop: int) -> np.ndarray:
        out = self.array[start:stop].astype(np.float64)
        end = (self.offset + 4 * stop) // mmap.PAGESIZE * mmap.PAGESIZE
        if end < self.dropped:  # a new pass over the update
            self.dropped = (self.offset + 4 * start) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > self.dropped:
            self.map.madvise(mmap.MADV_DONTNEED, self.dropped, end - self.dropped)
            self.dropped = end
        return out

    def shape_of(self, name: str) -> tuple[int, ...]:
        return (self.params,)


def _madvise_updates(spec: dict[str, Any]) -> list[Any]:
    from fl_orchestrator.aggregation.chunks import LazyUpdate

    class MadviseUpdate(_MadviseUpdate, LazyUpdate):
        def __getitem__(self, name: str) -> np.ndarray:
            return self.array

        def __iter__(self) -> Any:
            return iter(("w",))

        def __len__(self) -> int:
            return 1

    return [MadviseUpdate(path, offset, spec["params"]) for path, offset in spec["files"]]


def child(spec_path: Path) -> None:
    """Run one strategy (or the naive baseline) and print its figures as one JSON line."""
    spec = json.loads(spec_path.read_text())
    sampler = RssSampler("self", 0.02).start()
    params, count = spec["params"], len(spec["files"])
    before = self_peak_rss()
    started = time.perf_counter()
    if spec["what"] == "naive_median":
        stacked = np.empty((count, params), dtype=np.float32)
        for row, (path, offset) in enumerate(spec["files"]):
            with open(path, "rb") as handle:
                handle.seek(offset)
                handle.readinto(memoryview(stacked[row]).cast("B"))
        started = time.perf_counter()
        result = np.median(stacked, axis=0)
        seconds = time.perf_counter() - started
    else:
        from fl_orchestrator.aggregation.registry import build_strategy

        strategy = build_strategy(spec["strategy"])
        readers = {"pread": _pread_updates, "madvise": _madvise_updates, "memmap": _memmaps}
        updates = readers[spec["what"]](spec)
        strategy.begin_round(1, {"w": np.zeros(params, dtype=np.float32)})
        started = time.perf_counter()
        strategy.aggregate_all(updates, [100 + i for i in range(count)])
        result = strategy.finish()["w"]
        seconds = time.perf_counter() - started
    sampler.stop()
    print(
        json.dumps(
            {
                "peak_rss": self_peak_rss(),
                "seconds": seconds,
                "rss_before": before,
                "peak_anon": sampler.peak(what="anon"),
                "peak_file": sampler.peak(what="file"),
                "peak_sampled": sampler.peak(),
                "finite": bool(np.isfinite(result).all()),
            }
        )
    )


# ---- the parent ---------------------------------------------------------------------------


def _run_child(spec: dict[str, Any], folder: Path, name: str, timeout_seconds: float) -> dict[str, Any]:
    spec_path = folder / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    # On timeout, subprocess.run kills this child (by its pid) before raising.
    done = subprocess.run(
        [sys.executable, str(Path(__file__)), "--child", str(spec_path)],
        capture_output=True,
        text=True,
        timeout=timeout_seconds,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    out = done.stdout
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return figures


def _importable() -> str | None:
    """Why the strategies cannot be built here, or None when they can."""
    try:
        registry = importlib.import_module("fl_orchestrator.aggregation.registry")
        for name in STRATEGIES:
            registry.build_strategy(name)
    except Exception as exc:  # a module half-written by someone else: skip, say why
        what = "fl_orchestrator.aggregation.registry.build_strategy"
        return f"{what} is not usable yet: {type(exc).__name__}: {exc}"
    return None


def run(sizes: Sizes, folder: Path, shared: dict[str, Any]) -> Outcome:
    """Benchmark 3; uses the ingest benchmark's result files when they match its size."""
    why = _importable()
    if why is not None:
        return Outcome("skipped", {"strategies": list(STRATEGIES)}, [Row("3 robust", "all", "skipped")], why)
    files: list[Path] = shared.get("result_files", [])
    if len(files) != sizes.robust_files or shared.get("result_params") != sizes.robust_params:
        from bench_ingest import write_result_files

        written, _ = write_result_files(folder / "files", sizes.robust_files, sizes.robust_params)
        files = [f.path for f in written]
    located = []
    for path in files:
        offset, length = payload_location(path)
        assert length == 4 * sizes.robust_params
        located.append((str(path), offset))
    base_spec = {"params": sizes.robust_params, "files": located}
    timeout = sizes.daemon_timeout_seconds
    results: dict[str, dict[str, Any]] = {}
    results["naive_median"] = _run_child({**base_spec, "what": "naive_median"}, folder, "naive", timeout)
    for name in STRATEGIES:
        results[name] = _run_child({**base_spec, "what": "memmap", "strategy": name}, folder, name, timeout)
    for how in CANDIDATES:
        key = f"fedmedian_{how}_candidate"
        try:
            results[key] = _run_child(
                {**base_spec, "what": how, "strategy": "fedmedian"}, folder, how, timeout
            )
        except RuntimeError as exc:  # a candidate needs chunks.LazyUpdate; not worth failing the run
            results[key] = {"error": str(exc)[-500:]}
    naive = results["naive_median"]
    data: dict[str, Any] = {
        "files": len(located),
        "params_per_file": sizes.robust_params,
        "input_bytes": len(located) * 4 * sizes.robust_params,
        "target_peak_rss_bytes": TARGET_PEAK_BYTES,
        "results": results,
    }
    rows = [
        Row(
            "3 robust",
            "naive np.median (N, P) stacked",
            f"{fmt_seconds(naive['seconds'])}, peak {fmt_mib(naive['peak_rss'])}",
            "",
            "1.00",
        )
    ]
    for name in (*STRATEGIES, *(f"fedmedian_{how}_candidate" for how in CANDIDATES)):
        got = results[name]
        if "error" in got:
            rows.append(Row("3 robust", name, "error"))
            continue
        passed = got["peak_rss"] <= TARGET_PEAK_BYTES if name in STRATEGIES else None
        data[f"pass_{name}"] = passed
        rows.append(
            Row(
                "3 robust",
                f"{name} time",
                fmt_seconds(got["seconds"]),
                fmt_seconds(naive["seconds"]),
                f"{got['seconds'] / naive['seconds']:.2f}",
            )
        )
        rows.append(
            Row(
                "3 robust",
                f"{name} peak RSS (anon {fmt_mib(got['peak_anon'])}, file {fmt_mib(got['peak_file'])})",
                fmt_mib(got["peak_rss"]),
                fmt_mib(naive["peak_rss"]),
                f"{got['peak_rss'] / naive['peak_rss']:.2f}",
                "<= 1024 MiB" if passed is not None else "",
                verdict(passed),
            )
        )
    return Outcome("ok", data, rows)


def main() -> None:
    """Child entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", type=Path, required=True)
    child(parser.parse_args().child)


if __name__ == "__main__":
    main()
