"""Benchmark 1: ingest + FedAvg throughput, with its breakdown and a profile.

Result files are written with the project's encoder and ``atomic_write``, read
once so they sit in the page cache, then each is read, decoded and validated by
``InboundReader.read_inbound`` and folded by ``FedAvg.fold``: the daemon's path.

- sequential: one thread does read_inbound then fold, file after file.
- pipelined: the daemon's shape; one thread reads and validates while another
  folds, handing each decoded result over through a channel with no buffer
  (as the daemon's event channel, buffer 0): the reader waits until the folder
  takes it, so at most one result is folded and one waits to be handed over.
- baseline: ``np.add.reduce`` over the same decoded arrays held in memory
  (numpy's read bandwidth on this machine); ``np.maximum.reduce`` is reported
  beside it for reference.

The breakdown wraps the functions ``read_inbound`` calls (looked up in their
modules at call time), so it times exactly the code the daemon runs.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from harness import GB, Outcome, Row, Sizes, fmt_rate, fmt_seconds, interleaved, verdict
from simulator import AGGREGATOR, JOB, site_emails

import fl_orchestrator.intake.reader as intake_module
import fl_orchestrator.wire.messages as messages_module
from fl_orchestrator.aggregation.fedavg import FedAvg
from fl_orchestrator.config.schema import LimitsSection
from fl_orchestrator.intake.reader import Inbound, InboundReader
from fl_orchestrator.storage.atomic import atomic_write
from fl_orchestrator.wire.layout import FileKind, JobLayout
from fl_orchestrator.wire.messages import Envelope, ResultMessage, encode_result_frames, model_spec

TARGET_RATIO = 0.35


@dataclass(frozen=True)
class ResultFile:
    """One result file of the benchmark."""

    path: Path
    datasite: str


def write_result_files(
    folder: Path, count: int, params: int
) -> tuple[list[ResultFile], dict[str, np.ndarray]]:
    """Write ``count`` ok results of ``params`` float32 each; return them and the global model."""
    layout = JobLayout(folder / "syftbox", JOB, AGGREGATOR)
    rng = np.random.default_rng(0)
    model = {"w": rng.standard_normal(params, dtype=np.float32)}
    files = []
    for index, site in enumerate(site_emails(count)):
        task_id = secrets.token_hex(16)
        update = {"w": model["w"] + np.float32(index * 1e-3)}
        envelope = Envelope(JOB, 1, secrets.token_hex(16), task_id, time.time(), None)
        message = ResultMessage(envelope, True, 100 + index, {"loss": 0.5}, arrays=update)
        path = layout.result_path(site, task_id)
        atomic_write(path, encode_result_frames(message), durable=False)
        files.append(ResultFile(path, site))
    os.sync()  # no write-back of these files may run during the timed reads
    warm_page_cache([f.path for f in files])
    return files, model


def warm_page_cache(paths: list[Path]) -> None:
    """Read every file once so the measured reads come from the page cache."""
    buffer = bytearray(1 << 24)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


class StageClock:
    """Seconds spent in named functions, by wrapping them in their modules for a while."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def wrapping(self, targets: list[tuple[Any, str, str]]) -> Iterator[list[str]]:
        """Wrap (module, function name, stage) triples; yield the stages that could be wrapped."""
        originals: list[tuple[Any, str, Any]] = []
        wrapped: list[str] = []
        for module, name, stage in targets:
            original = getattr(module, name, None)
            if original is None:
                continue
            originals.append((module, name, original))
            setattr(module, name, self._timer(original, stage))
            wrapped.append(stage)
        try:
            yield wrapped
        finally:
            for module, name, original in originals:
                setattr(module, name, original)

    def _timer(self, fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

        return timed_call


class Ingest:
    """The measured passes over one set of result files."""

    def __init__(self, root: Path, files: list[ResultFile], model: dict[str, np.ndarray]) -> None:
        self.files = files
        self.model = model
        layout = JobLayout(root, JOB, AGGREGATOR)
        # As the daemon builds it: with the global model, so the update norm is measured
        # (the outlier rule, on by default, needs it).
        sites = frozenset(f.datasite for f in files)
        self.reader = InboundReader(layout, sites, model_spec(model), LimitsSection(), global_model=model)

    def read(self, item: ResultFile) -> ResultMessage:
        """read_inbound one file; fail loudly if it is refused."""
        outcome = self.reader.read_inbound(item.path, FileKind.RESULT, item.datasite)
        if not isinstance(outcome, Inbound):
            raise RuntimeError(f"{item.path} was refused: {outcome.reason}: {outcome.detail}")
        message = outcome.message
        assert isinstance(message, ResultMessage)
        return message

    def sequential(self) -> None:
        """read_inbound then fold, file after file, in one thread."""
        strategy = FedAvg()
        strategy.begin_round(1, self.model)
        for item in self.files:
            message = self.read(item)
            strategy.fold(message.arrays, message.num_examples)

    def pipelined(self) -> None:
        """Read and validate in one thread, fold in this one, through a channel with no buffer.

        Like an anyio memory stream of buffer 0: each put returns only once the
        folding thread has taken the item (``join`` waits for its ``task_done``).
        """
        strategy = FedAvg()
        strategy.begin_round(1, self.model)
        waiting: queue.Queue[ResultMessage | BaseException | None] = queue.Queue(maxsize=1)

        def hand_over(item: ResultMessage | BaseException | None) -> None:
            waiting.put(item)
            waiting.join()

        def produce() -> None:
            try:
                for item in self.files:
                    hand_over(self.read(item))
            except BaseException as exc:  # handed to the folding thread, which re-raises it
                hand_over(exc)
            hand_over(None)

        producer = threading.Thread(target=produce, name="intake")
        producer.start()
        try:
            while True:
                message = waiting.get()
                waiting.task_done()
                if message is None:
                    break
                if isinstance(message, BaseException):
                    raise message
                strategy.fold(message.arrays, message.num_examples)
        finally:
            producer.join()

    def staged(self) -> dict[str, float]:
        """One sequential pass with each stage timed; seconds per stage."""
        clock = StageClock()
        # The first name that exists in the module: the intake code is still moving.
        candidates = [
            (intake_module, ("read_below", "_read_regular_file"), "read"),
            (intake_module, ("decode_message",), "decode"),
            (intake_module, ("check_weights_match",), "validate"),
            (messages_module, ("_all_finite",), "finite_check"),
        ]
        targets = [
            (module, next(n for n in names if hasattr(module, n)), stage)
            for module, names, stage in candidates
            if any(hasattr(module, n) for n in names)
        ]
        strategy = FedAvg()
        strategy.begin_round(1, self.model)
        total_read = 0.0
        fold = 0.0
        with clock.wrapping(targets):
            for item in self.files:
                started = time.perf_counter()
                message = self.read(item)
                middle = time.perf_counter()
                strategy.fold(message.arrays, message.num_examples)
                total_read += middle - started
                fold += time.perf_counter() - middle
                del message
        started = time.perf_counter()
        strategy.finish()
        finish = time.perf_counter() - started
        stages = dict(clock.seconds)
        # finite_check runs inside validate: report validate without it.
        if "validate" in stages and "finite_check" in stages:
            stages["validate"] -= stages["finite_check"]
        stages["read_inbound_other"] = total_read - sum(stages.values())
        stages["fold"] = fold
        stages["finish_once_per_round"] = finish
        return stages

    def held_arrays(self) -> list[np.ndarray]:
        """Every file's decoded array, held in memory (the baseline's input)."""
        return [self.read(item).arrays["w"] for item in self.files]


def profile_pass(ingest: Ingest, top: int = 12) -> list[dict[str, Any]]:
    """cProfile of one sequential pass: the functions with the most own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    ingest.sequential()
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows: list[dict[str, Any]] = []
    raw: Any = stats.stats  # type: ignore[attr-defined]
    for (filename, line, name), (_, calls, tottime, cumtime, _) in raw.items():
        rows.append(
            {
                "function": f"{Path(filename).name}:{line}({name})",
                "calls": calls,
                "tottime_s": round(tottime, 4),
                "cumtime_s": round(cumtime, 4),
            }
        )
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    return rows[:top]


# ---- candidate fixes, measured on the same files (prototypes, not project code) ----------


def _read_into(path: Path, allocate: Callable[[int], Any]) -> Any:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        buffer = allocate(size)
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < size:
            count = os.readv(fd, [view[filled:]])
            if count == 0:
                raise OSError("short read")
            filled += count
        return buffer
    finally:
        os.close(fd)


def candidate_reads(files: list[ResultFile], repeats: int) -> dict[str, float]:
    """Best seconds to read every file: into a new np.empty each (as the intake does) or one reused buffer."""
    largest = max(f.path.stat().st_size for f in files)
    reused = np.empty(largest, dtype=np.uint8)

    def with_np_empty() -> None:
        for f in files:
            _read_into(f.path, lambda n: np.empty(n, dtype=np.uint8))

    def with_reused() -> None:
        for f in files:
            _read_into(f.path, lambda n: reused[:n])

    best = {"np_empty": float("inf"), "reused_buffer": float("inf")}
    for _ in range(repeats):
        for name, fn in (
            ("np_empty", with_np_empty),
            ("reused_buffer", with_reused),
        ):
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def fold_batched(total: np.ndarray, updates: list[np.ndarray], weights: list[float], block: int) -> None:
    """WeightedSum.add's loop for k updates at once: one pass over the float64 sum instead of k.

    Each block of the sum is read and written once per batch; the weighted
    updates are added up in a cache-resident scratch block first.
    """
    scratch = np.empty(block, dtype=np.float64)
    spare = np.empty(block, dtype=np.float64)
    size = total.size
    for start in range(0, size, block):
        stop = min(start + block, size)
        part, other = scratch[: stop - start], spare[: stop - start]
        np.multiply(updates[0][start:stop], weights[0], out=part, casting="unsafe")
        for update, weight in zip(updates[1:], weights[1:], strict=True):
            np.multiply(update[start:stop], weight, out=other, casting="unsafe")
            part += other
        total[start:stop] += part


def candidate_folds(held: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Best seconds to fold every held array one at a time (today's loop) or k at a time."""
    from fl_orchestrator.aggregation.fedavg import BLOCK_ELEMENTS

    flat = [array.reshape(-1) for array in held]
    total = np.zeros(flat[0].size, dtype=np.float64)
    best: dict[str, float] = {}
    for _ in range(repeats):
        for k in (1, 2, 4):
            started = time.perf_counter()
            for first in range(0, len(flat), k):
                group = flat[first : first + k]
                fold_batched(total, group, [3.0] * len(group), BLOCK_ELEMENTS)
            key = f"batch_{k}"
            best[key] = min(best.get(key, float("inf")), time.perf_counter() - started)
    return best


# ---- the benchmark ----------------------------------------------------------------------


def run(sizes: Sizes, folder: Path, shared: dict[str, Any]) -> Outcome:
    """Benchmark 1; leaves the result files in shared['result_files'] for the robust benchmark."""
    files, model = write_result_files(folder, sizes.ingest_files, sizes.ingest_params)
    shared["result_files"] = [f.path for f in files]
    shared["result_params"] = sizes.ingest_params
    update_bytes = sum(int(model["w"].nbytes) for _ in files)
    ingest = Ingest(folder / "syftbox", files, model)
    held = ingest.held_arrays()

    def baseline() -> None:
        for array in held:
            np.add.reduce(array)

    def reference_max() -> None:
        for array in held:
            np.maximum.reduce(array)

    sequential, base = interleaved(ingest.sequential, baseline, sizes.repeats)
    pipelined, base_again = interleaved(ingest.pipelined, baseline, sizes.repeats)
    _, maxes = interleaved(lambda: None, reference_max, sizes.repeats)
    base_seconds = min(base + base_again)
    stage_runs = [ingest.staged() for _ in range(sizes.repeats)]
    stages = {k: min(run[k] for run in stage_runs) for k in stage_runs[0]}
    profile = profile_pass(ingest)
    reads = candidate_reads(files, sizes.repeats)
    folds = candidate_folds(held, sizes.repeats)
    held.clear()

    def rate(seconds: list[float] | float) -> float:
        best = min(seconds) if isinstance(seconds, list) else seconds
        return update_bytes / best / GB

    base_rate = rate(base_seconds)
    seq_rate, pipe_rate = rate(sequential), rate(pipelined)
    per_result = sum(v for k, v in stages.items() if k != "finish_once_per_round")
    data: dict[str, Any] = {
        "files": len(files),
        "params_per_file": sizes.ingest_params,
        "update_bytes": update_bytes,
        "sequential_gbps": seq_rate,
        "pipelined_gbps": pipe_rate,
        "baseline_add_reduce_gbps": base_rate,
        "reference_maximum_reduce_gbps": rate(maxes),
        "sequential_ratio": seq_rate / base_rate,
        "pipelined_ratio": pipe_rate / base_rate,
        "target_ratio": TARGET_RATIO,
        "pass_sequential": seq_rate / base_rate >= TARGET_RATIO,
        "pass_pipelined": pipe_rate / base_rate >= TARGET_RATIO,
        "seconds": {"sequential": sequential, "pipelined": pipelined, "baseline": base + base_again},
        "breakdown_seconds": stages,
        "breakdown_share": {k: v / per_result for k, v in stages.items() if k != "finish_once_per_round"},
        "breakdown_gbps": {k: rate(v) for k, v in stages.items() if v > 0},
        "profile_top_tottime": profile,
        "candidates": {
            "read_all_files_seconds": reads,
            "fold_all_files_seconds": folds,
        },
    }
    target = f">= {TARGET_RATIO} x baseline"
    rows = []
    for label, measured in (("sequential", seq_rate), ("pipelined (daemon shape)", pipe_rate)):
        rows.append(
            Row(
                "1 ingest",
                f"read_inbound+fold, {label}",
                fmt_rate(measured),
                fmt_rate(base_rate),
                f"{measured / base_rate:.2f}",
                target,
                verdict(measured / base_rate >= TARGET_RATIO),
            )
        )
    for stage in ("read", "decode", "validate", "finite_check", "read_inbound_other", "fold"):
        if stage in stages:
            rows.append(
                Row(
                    "1 ingest",
                    f"  stage {stage} ({stages[stage] / per_result:.0%})",
                    f"{fmt_seconds(stages[stage])} = {fmt_rate(rate(max(stages[stage], 1e-9)))}",
                    fmt_rate(base_rate),
                    f"{rate(max(stages[stage], 1e-9)) / base_rate:.2f}",
                )
            )
    rows.append(
        Row(
            "1 ingest",
            "  read only: np.empty per file (intake) / candidate one reused buffer",
            " / ".join(fmt_rate(rate(reads[k])) for k in ("np_empty", "reused_buffer")),
            fmt_rate(base_rate),
        )
    )
    rows.append(
        Row(
            "1 ingest",
            "  candidate fold 1 / 2 / 4 results per pass",
            " / ".join(fmt_rate(rate(folds[f"batch_{k}"])) for k in (1, 2, 4)),
            fmt_rate(base_rate),
        )
    )
    return Outcome("ok", data, rows)
