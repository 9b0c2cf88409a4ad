"""Benchmark 3: robust strategies (median, trimmed mean, Krum; Multi-Krum, Bulyan) over counted result files.

Each strategy is built with ``fl_orchestrator.aggregation.registry.build_strategy``
and runs in its own process, so its peak RSS (its own VmHWM) is its own.
Its inputs are what the daemon hands whole-set strategies at the end of a
round: one ``fl_orchestrator.intake.result_files.FileUpdate`` per result file
(read block by block with ``os.pread``), passed to ``strategy.aggregate_all``
and then ``strategy.finish()``, after ``begin_round(1, global_model)``. The
timed part is what the daemon's round work does: open the FileUpdates (which
decodes each file's header), aggregate_all, finish.

For comparison, median, trimmed mean and Krum also run on ``np.memmap`` views
over the array payloads (the path the daemon used before FileUpdate). Baseline, in the
same run: ``np.median`` over the same results stacked into one (N, P) float32
array.

RSS counts the file pages a memmap has touched (RssFile) as well as the
process's own memory (RssAnon); the child samples both, because file pages are
page cache the kernel can drop, while anonymous memory is what can run a
machine out of memory.

Run as ``bench_robust.py --child SPEC.json`` it is the child.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import MIB, Outcome, Row, RssSampler, Sizes, fmt_mib, fmt_seconds, self_peak_rss, verdict

STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")

_SHORT = {"num_malicious_nodes": "f", "num_nodes_to_select": "m"}


def extra_strategies(count: int) -> dict[str, dict[str, int]]:
    """The rest of the Krum family, run on the daemon's path only (FileUpdate), and its parameters.

    f = 2 of 32 results, so that Multi-Krum averages several results and Bulyan
    trims (θ = 28, β = 24); less when there are too few results for Bulyan (smoke).
    """
    f = max(0, min(2, (count - 3) // 4))
    return {
        "multikrum": {"num_malicious_nodes": f, "num_nodes_to_select": min(5, count)},
        "bulyan": {"num_malicious_nodes": f},
    }


# How each strategy's results are read: FileUpdate (the daemon's path, the primary
# figures) and np.memmap (the previous path, for comparison).
READERS = ("file_update", "memmap")
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


def _memmaps(spec: dict[str, Any]) -> list[Any]:
    return [
        {"w": np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=(spec["params"],))}
        for path, offset in spec["files"]
    ]


def _identities(spec: dict[str, Any]) -> list[Any]:
    """Each file's FileIdentity, as the intake recorded it when it counted the result."""
    from fl_orchestrator.intake.safe_read import FileIdentity

    out = []
    for path, _ in spec["files"]:
        info = os.stat(path)
        out.append(FileIdentity(info.st_ino, info.st_size, info.st_mtime_ns))
    return out


def _file_updates(spec: dict[str, Any], identities: list[Any]) -> list[Any]:
    """The daemon's inputs for a whole-set strategy: one FileUpdate per counted result."""
    from fl_orchestrator.intake.result_files import FileUpdate

    return [
        FileUpdate(Path(path), identity)
        for (path, _), identity in zip(spec["files"], identities, strict=True)
    ]


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
        parts = {"median": seconds}
    else:
        from fl_orchestrator.aggregation.registry import build_strategy

        strategy = build_strategy(spec["strategy"], spec.get("strategy_params"))
        strategy.begin_round(1, {"w": np.zeros(params, dtype=np.float32)})
        counts = [100 + i for i in range(count)]
        updates: list[Any] = []
        if spec["what"] == "file_update":
            identities = _identities(spec)  # recorded by the intake when each result was counted
            started = time.perf_counter()
            updates = _file_updates(spec, identities)
        else:
            updates = _memmaps(spec)
            started = time.perf_counter()
        opened = time.perf_counter()
        strategy.aggregate_all(updates, counts)
        aggregated = time.perf_counter()
        result = strategy.finish()["w"]
        finished = time.perf_counter()
        seconds = finished - started
        parts = {
            "open": opened - started,
            "aggregate_all": aggregated - opened,
            "finish": finished - aggregated,
        }
        for update in updates:
            close = getattr(update, "close", None)
            if close is not None:
                close()
    sampler.stop()
    print(
        json.dumps(
            {
                "peak_rss": self_peak_rss(),
                "seconds": seconds,
                "parts_seconds": parts,
                "rss_before": before,
                "peak_anon": sampler.peak(what="anon"),
                "peak_file": sampler.peak(what="file"),
                "peak_sampled": sampler.peak(),
                "finite": bool(np.isfinite(result).all()),
                "result_sha256": hashlib.sha256(np.ascontiguousarray(result).tobytes()).hexdigest(),
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
        for name, params in extra_strategies(32).items():
            registry.build_strategy(name, params)
        result_files = importlib.import_module("fl_orchestrator.intake.result_files")
        result_files.FileUpdate  # noqa: B018 - only checks that it exists
    except Exception as exc:  # a module half-written by someone else: skip, say why
        what = "build_strategy or result_files.FileUpdate"
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
        for how in READERS:
            key = name if how == "file_update" else f"{name}_{how}"
            spec = {**base_spec, "what": how, "strategy": name}
            results[key] = _run_child(spec, folder, key, timeout)
    extras = extra_strategies(len(located))
    for name, params in extras.items():
        spec = {**base_spec, "what": "file_update", "strategy": name, "strategy_params": params}
        results[name] = _run_child(spec, folder, name, timeout)
    naive = results["naive_median"]
    data: dict[str, Any] = {
        "files": len(located),
        "params_per_file": sizes.robust_params,
        "input_bytes": len(located) * 4 * sizes.robust_params,
        "target_peak_rss_bytes": TARGET_PEAK_BYTES,
        "readers": {"primary": "FileUpdate (os.pread per block)", "memmap": "np.memmap (previous path)"},
        "extra_strategy_params": extras,
        "results": results,
    }
    naive_cell = f"{fmt_seconds(naive['seconds'])}, {fmt_mib(naive['peak_rss'])}"
    rows = [
        Row(
            "3 robust",
            "naive np.median (N, P) stacked: time, peak RSS",
            naive_cell,
            "",
            "1.00",
        )
    ]
    for name in STRATEGIES:
        got, mapped = results[name], results[f"{name}_memmap"]
        passed = got["peak_rss"] <= TARGET_PEAK_BYTES
        data[f"pass_{name}"] = passed
        # Both readers must give the strategy the same numbers.
        data[f"same_result_{name}_memmap"] = got["result_sha256"] == mapped["result_sha256"]
        rows.append(
            Row(
                "3 robust",
                f"{name} time (FileUpdate, daemon path)",
                fmt_seconds(got["seconds"]),
                fmt_seconds(naive["seconds"]),
                f"{got['seconds'] / naive['seconds']:.2f}",
            )
        )
        rows.append(_rss_row(name, got, naive))
        rows.append(
            Row(
                "3 robust",
                f"  {name}: open / aggregate_all / finish",
                " / ".join(fmt_seconds(got["parts_seconds"][k]) for k in ("open", "aggregate_all", "finish")),
                fmt_seconds(got["seconds"]),
            )
        )
        rows.append(
            Row(
                "3 robust",
                f"  {name} memmap (previous path): time, peak RSS (anon {fmt_mib(mapped['peak_anon'])}, "
                f"file {fmt_mib(mapped['peak_file'])})",
                f"{fmt_seconds(mapped['seconds'])}, {fmt_mib(mapped['peak_rss'])}",
                naive_cell,
                f"{mapped['seconds'] / naive['seconds']:.2f}, {mapped['peak_rss'] / naive['peak_rss']:.2f}",
            )
        )
    for name, params in extras.items():
        got = results[name]
        passed = got["peak_rss"] <= TARGET_PEAK_BYTES
        data[f"pass_{name}"] = passed
        settings = ", ".join(f"{_SHORT[key]} {value}" for key, value in params.items())
        parts = " / ".join(fmt_seconds(got["parts_seconds"][k]) for k in ("open", "aggregate_all", "finish"))
        rows.append(
            Row(
                "3 robust",
                f"{name} ({settings}) time (FileUpdate); open / aggregate_all / finish",
                f"{fmt_seconds(got['seconds'])}; {parts}",
                fmt_seconds(naive["seconds"]),
                f"{got['seconds'] / naive['seconds']:.2f}",
            )
        )
        rows.append(_rss_row(name, got, naive))
    return Outcome("ok", data, rows)


def _rss_row(name: str, got: dict[str, Any], naive: dict[str, Any]) -> Row:
    """A strategy's peak RSS against the stacked median's, and the target."""
    return Row(
        "3 robust",
        f"{name} peak RSS (anon {fmt_mib(got['peak_anon'])}, file {fmt_mib(got['peak_file'])})",
        fmt_mib(got["peak_rss"]),
        fmt_mib(naive["peak_rss"]),
        f"{got['peak_rss'] / naive['peak_rss']:.2f}",
        f"<= {fmt_mib(TARGET_PEAK_BYTES)}",
        verdict(got["peak_rss"] <= TARGET_PEAK_BYTES),
    )


def main() -> None:
    """Child entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", type=Path, required=True)
    child(parser.parse_args().child)


if __name__ == "__main__":
    main()
