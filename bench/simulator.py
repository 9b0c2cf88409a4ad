"""The real daemon as a subprocess, and a simulator that plays every datasite by writing files.

The simulator does what the datasite runner does, minus training: it writes each
datasite's heartbeat, reads the task files the daemon writes, and answers each
with ``results/<task id>.result`` carrying the task's round and ``reply_to``.
Results can be staged under a hidden ``.tmp`` name (which the daemon ignores)
and renamed into place later, so the instant a result "lands" is known exactly.

At N = 10,000 datasites and 1M parameters, one round of results is 40 GB: more
than the disk and the page cache can take for a benchmark. A job whose model
starts at zeros (``JobSpec.init``) gets no-op results of zeros, and those can be
written as sparse files (``Datasites.answer_with_holes``): the array bytes are a
hole, which reads back as zeros and takes no disk block, so a result costs an
inode and its header. Such a job turns off ``limits.refuse_sparse_files`` (a
check on the size fstat already gave, before any read); the daemon reads,
hashes and folds every byte as usual.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from harness import REPO, RssSampler, proc_io, proc_status

from fl_orchestrator.storage.atomic import atomic_write, temp_name_for
from fl_orchestrator.wire.frames import FrameLimits
from fl_orchestrator.wire.layout import JobLayout
from fl_orchestrator.wire.messages import (
    Envelope,
    HeartbeatMessage,
    ModelMessage,
    ModelRef,
    ResultMessage,
    TaskMessage,
    decode_message,
    encode_heartbeat,
    encode_result_frames,
)

JOB = "bench"
AGGREGATOR = "agg@bench.example.org"
_MODEL_LIMITS = FrameLimits(max_header_bytes=16 * 1024 * 1024, max_elements=2**34)

Event = dict[str, Any]


def site_emails(count: int) -> list[str]:
    """ds0000@bench.example.org, ds0001@bench.example.org, ..."""
    return [f"ds{i:04d}@bench.example.org" for i in range(count)]


@dataclass(frozen=True)
class JobSpec:
    """A benchmark job: every listed datasite trains every round, one float32 array ``w``."""

    sites: int
    params: int
    num_rounds: int = 1
    round_timeout_seconds: float = 3600.0
    rescan_interval_seconds: float = 15.0
    debounce_milliseconds: int = 5
    # The model's initialiser: "zeros" lets the datasites answer with sparse files (see above),
    # which the daemon then has to accept (limits.refuse_sparse_files off).
    init: str = "normal"
    # Listed in the job beside the ``sites`` trainers, but not needed for a round to start or close
    # (the flood benchmark's hostile datasite: it writes no heartbeat, so it is never selected).
    extra_datasites: tuple[str, ...] = ()


def write_job(workdir: Path, spec: JobSpec) -> Path:
    """Write job.toml into workdir (SyftBox root and state dir beside it); return its path."""
    workdir.mkdir(parents=True, exist_ok=True)
    table: dict[str, Any] = {
        "job": {
            "name": JOB,
            "num_rounds": spec.num_rounds,
            "round_timeout_seconds": spec.round_timeout_seconds,
            "fraction_train": 1.0,
            "min_train_nodes": spec.sites,
            "min_available_nodes": spec.sites,
            "available_timeout_seconds": 600.0,
            "max_round_retries": 0,
        },
        "syftbox": {
            "root": "syftbox",
            "aggregator_email": AGGREGATOR,
            "datasites": [*site_emails(spec.sites), *spec.extra_datasites],
            "presence_ttl_seconds": 86400.0,
            # One file per model: the simulator reads it whole, and parts are a sync concern.
            "part_bytes": 0,
            # One shared folder and no SyftBox server: no cap on a file's size (10M params is 40 MB).
            "server_max_file_bytes": 0,
        },
        "model": {
            "source": "random",
            "seed": 0,
            "arrays": {"w": {"shape": [spec.params], "dtype": "float32", "init": spec.init, "scale": 0.01}},
        },
        "state": {"state_dir": "state"},
        "daemon": {
            "rescan_interval_seconds": spec.rescan_interval_seconds,
            "watch_debounce_milliseconds": spec.debounce_milliseconds,
        },
        "logging": {"format": "json", "level": "info"},
    }
    if spec.init == "zeros":
        table["limits"] = {"refuse_sparse_files": False}
    path = workdir / "job.toml"
    path.write_bytes(tomli_w.dumps(table).encode())
    return path


# Set by run.py --trace-gc: run the daemon's main() through daemon_gc_trace.py instead.
TRACE_GC = False


def daemon_command(config_path: Path) -> list[str]:
    """The installed ``fl-orchestratord`` next to this interpreter, or the module if it is missing."""
    script = Path(sys.executable).parent / "fl-orchestratord"
    if TRACE_GC:
        head = [sys.executable, str(Path(__file__).with_name("daemon_gc_trace.py"))]
    elif script.exists():
        head = [str(script)]
    else:
        head = [sys.executable, "-m", "fl_orchestrator.cli.daemon_main"]
    return [*head, "--config", str(config_path), "--log-format", "json"]


@dataclass(frozen=True)
class DaemonExit:
    """How the daemon process ended."""

    code: int
    peak_rss: int  # bytes: the last VmHWM read before the process ended (see harness.self_peak_rss)
    ru_maxrss: int  # bytes, from wait4; includes this process's RSS at spawn time, so only an upper bound
    killed: bool


class DaemonError(RuntimeError):
    """The daemon exited, or did not log what was awaited in time."""


class DaemonProcess:
    """``fl-orchestratord`` as a subprocess: its parsed JSON log lines, its memory and its exit."""

    def __init__(
        self,
        config_path: Path,
        log_path: Path,
        *,
        sample_interval_seconds: float = 0.01,
        command_prefix: Sequence[str] = (),
    ) -> None:
        self.config_path = config_path
        # A program that execs the daemon in the same process (so pid, wait4 and /proc stay its own),
        # e.g. setpriv to run it without some of root's capabilities.
        self.command_prefix = tuple(command_prefix)
        self.log_path = log_path
        self.sample_interval = sample_interval_seconds
        self.events: list[Event] = []
        self._queue: queue.Queue[Event | None] = queue.Queue()
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self.sampler: RssSampler | None = None
        self.exit: DaemonExit | None = None
        self.last_hwm = 0

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        assert self._process is not None
        return self._process.pid

    def __enter__(self) -> DaemonProcess:
        env = dict(os.environ, FL_ORCHESTRATOR_LOG_FORMAT="json")
        self._process = subprocess.Popen(
            [*self.command_prefix, *daemon_command(self.config_path)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.sampler = RssSampler(self._process.pid, self.sample_interval).start()
        self._reader = threading.Thread(target=self._read_log, name="daemon-log", daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.exit is None and self._process is not None:
            self.finish(timeout_seconds=10.0, kill_after=True)

    def _read_log(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        with open(self.log_path, "wb") as raw_log:
            for raw in self._process.stdout:
                raw_log.write(raw)
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"event": "raw", "line": line}
                if not isinstance(event, dict):
                    event = {"event": "raw", "line": line}
                if event.get("event") in ("job.finished", "job.failed", "daemon.stopping"):
                    self._read_hwm()  # the process is about to exit: its peak will not grow any more
                self.events.append(event)
                self._queue.put(event)
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[Event], bool], timeout_seconds: float, what: str) -> Event:
        """Consume log events until one matches; raise DaemonError on exit or timeout."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonError(f"timed out after {timeout_seconds:.0f} s waiting for {what}{self._tail()}")
            try:
                event = self._queue.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if event is None:
                self._queue.put(None)
                raise DaemonError(f"the daemon exited while waiting for {what}{self._tail()}")
            if predicate(event):
                return event

    def wait_event(self, name: str, timeout_seconds: float, **fields: Any) -> Event:
        """The next event called ``name`` whose fields equal ``fields``."""
        return self.wait_for(
            lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items()),
            timeout_seconds,
            f"{name} {fields}",
        )

    def wait_count(self, name: str, count: int, timeout_seconds: float, **fields: Any) -> None:
        """Wait until ``count`` events called ``name`` with these fields have been logged."""
        seen = 0
        while seen < count:
            self.wait_event(name, timeout_seconds, **fields)
            seen += 1

    def find(self, name: str, **fields: Any) -> list[Event]:
        """Every event logged so far called ``name`` with these fields."""
        return [
            e
            for e in list(self.events)
            if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
        ]

    def status(self) -> dict[str, int]:
        """The daemon's current /proc status memory figures."""
        return proc_status(self.pid)

    def io(self) -> dict[str, int]:
        """The daemon's /proc io counters."""
        return proc_io(self.pid)

    def _read_hwm(self) -> None:
        self.last_hwm = max(self.last_hwm, proc_status(self.pid).get("VmHWM", 0))

    def terminate(self) -> None:
        """Ask the daemon to stop (SIGTERM): it exits 0 once its state is saved."""
        if self._process is not None and self._process.poll() is None:
            self._read_hwm()
            os.kill(self._process.pid, signal.SIGTERM)

    def finish(self, timeout_seconds: float, *, kill_after: bool = True) -> DaemonExit:
        """Reap the daemon (wait4: exit code and peak RSS); SIGKILL it by pid if it overruns."""
        assert self._process is not None
        pid = self._process.pid
        deadline = time.monotonic() + timeout_seconds
        killed = False
        while True:
            reaped, status, usage = os.wait4(pid, os.WNOHANG)
            if reaped == pid:
                break
            if time.monotonic() > deadline:
                if not kill_after:
                    raise DaemonError(f"the daemon did not exit within {timeout_seconds:.0f} s")
                os.kill(pid, signal.SIGKILL)
                killed = True
                _, status, usage = os.wait4(pid, 0)
                break
            time.sleep(0.01)
        code = os.waitstatus_to_exitcode(status)
        self._process.returncode = code
        if self.sampler is not None:
            self.sampler.stop()
        if self._reader is not None:
            self._reader.join(timeout=10)
        sampled = self.sampler.peak(what="hwm") if self.sampler is not None else 0
        self.exit = DaemonExit(code, max(sampled, self.last_hwm), usage.ru_maxrss * 1024, killed)
        return self.exit

    def _tail(self, lines: int = 8) -> str:
        tail = [json.dumps(e)[:300] for e in self.events[-lines:]]
        return ("\nlast log lines:\n" + "\n".join(tail)) if tail else ""


@dataclass(frozen=True)
class Task:
    """One task the daemon wrote for one datasite."""

    datasite: str
    task_id: str
    round: int
    model: ModelRef


@dataclass(frozen=True)
class Staged:
    """A result written under its hidden temp name, ready to be renamed into place."""

    datasite: str
    temp: Path
    final: Path


class Datasites:
    """Plays every datasite of a job by writing files into their folders."""

    def __init__(self, root: Path, sites: Sequence[str]) -> None:
        self.layout = JobLayout(root, JOB, AGGREGATOR)
        self.sites = list(sites)
        # Set by answer_with_holes: the model of zeros every result answers with, as a sparse file.
        self.zero_model: dict[str, np.ndarray] | None = None

    @property
    def holes(self) -> bool:
        """Whether results are written as sparse files."""
        return self.zero_model is not None

    def answer_with_holes(self, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """From now on, write results as sparse files; return the model (of zeros) to answer with."""
        if any(np.any(array) for array in model.values()):
            raise ValueError("sparse results need a model of zeros (JobSpec(init='zeros'))")
        self.zero_model = model
        return model

    def prepare(self) -> None:
        """Create every results folder and write every heartbeat."""
        for site in self.sites:
            self.layout.results_dir(site).mkdir(parents=True, exist_ok=True)
            beat = HeartbeatMessage(Envelope(JOB, 0, secrets.token_hex(8), None, time.time(), None), "idle")
            atomic_write(self.layout.heartbeat_path(site), [encode_heartbeat(beat)], durable=False)

    def tasks(self, rnd: int, selected: Iterable[str]) -> list[Task]:
        """Decode the task files of round ``rnd`` written for the selected datasites."""
        found: list[Task] = []
        for site in selected:
            for path in sorted(self.layout.tasks_dir(site).glob("*.task")):
                message = decode_message(
                    path.read_bytes(), expect_kind="task", expect_job=JOB, limits=FrameLimits()
                )
                assert isinstance(message, TaskMessage)
                if message.envelope.round == rnd:
                    found.append(Task(site, path.stem, rnd, message.model))
        return found

    def read_model(self, ref: ModelRef) -> dict[str, np.ndarray]:
        """The broadcast model a task names (what a no-op training sends back)."""
        data = (self.layout.aggregator_dir / ref.path).read_bytes()
        message = decode_message(data, expect_kind="model", expect_job=JOB, limits=_MODEL_LIMITS)
        assert isinstance(message, ModelMessage)
        return message.arrays

    @staticmethod
    def result_frames(task: Task, arrays: dict[str, np.ndarray], num_examples: int) -> list[Any]:
        """An ok result answering ``task`` (the arrays are not copied)."""
        envelope = Envelope(JOB, task.round, secrets.token_hex(16), task.task_id, time.time(), None)
        return encode_result_frames(ResultMessage(envelope, True, num_examples, {"loss": 0.5}, arrays=arrays))

    def write_result(self, task: Task, frames: list[Any]) -> Path:
        """Write a result into place at once (temp name, rename; no fsync)."""
        path = self.layout.result_path(task.datasite, task.task_id)
        if self.holes:
            temp = temp_name_for(path)
            write_frames(temp, frames, holes=True)
            os.replace(temp, path)
        else:
            atomic_write(path, frames, durable=False)
        return path

    def stage_result(self, task: Task, frames: list[Any]) -> Staged:
        """Write a result under its hidden temp name; ``land`` renames it into place."""
        final = self.layout.result_path(task.datasite, task.task_id)
        temp = temp_name_for(final)
        write_frames(temp, frames, holes=self.holes)
        return Staged(task.datasite, temp, final)

    @staticmethod
    def land(staged: Staged) -> float:
        """Rename a staged result into place; return time.time() just before the rename."""
        at = time.time()
        os.replace(staged.temp, staged.final)
        return at

    def remove_results(self) -> None:
        """Delete every result file (the daemon ignores deletions)."""
        for site in self.sites:
            for path in self.layout.results_dir(site).glob("*.result"):
                path.unlink()


# With holes=True, a buffer at least this long is skipped (a hole) instead of written.
HOLE_MIN_BYTES = 64 * 1024


def write_frames(path: Path, frames: Iterable[Any], *, holes: bool = False) -> int:
    """Write buffers to a new file, no fsync; return the file's length.

    With ``holes``, every buffer of at least HOLE_MIN_BYTES is left as a hole (it
    reads back as zeros): the caller vouches that those buffers are zeros.
    """
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for chunk in frames:
            view = memoryview(chunk).cast("B")
            if holes and view.nbytes >= HOLE_MIN_BYTES:
                written += view.nbytes
                os.lseek(fd, view.nbytes, os.SEEK_CUR)
                continue
            while view:
                count = os.write(fd, view)
                written += count
                view = view[count:]
        if holes:
            os.ftruncate(fd, written)  # a hole at the end still counts in the length
    finally:
        os.close(fd)
    return written


# ---- bytes written ---------------------------------------------------------------------

Snapshot = dict[str, tuple[int, int]]


def snapshot(folders: Iterable[Path]) -> Snapshot:
    """(inode, size) of every file under the folders."""
    out: Snapshot = {}
    for folder in folders:
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    info = os.lstat(path)
                except OSError:
                    continue
                out[path] = (info.st_ino, info.st_size)
    return out


def bytes_written(before: Snapshot, after: Snapshot, categorise: Callable[[str], str]) -> dict[str, int]:
    """Bytes written between two snapshots, by category.

    A new or replaced file (new inode) counts whole; a file that grew in place
    (an append-only log) counts its growth. A file rewritten several times in
    between counts once, so this is a lower bound. An inode counts once: a hard
    link to a file that was already there, or to another new one, writes no bytes,
    and neither do the links under ``kept/`` to results the datasites wrote.
    """
    totals: dict[str, int] = {}
    inodes_before = {inode for inode, _ in before.values()}
    counted: set[int] = set()
    for path, (inode, size) in sorted(after.items()):
        old = before.get(path)
        if "kept" in Path(path).parts:
            continue
        if old is not None and old[0] == inode:
            grown = max(0, size - old[1])
        elif inode in inodes_before or inode in counted:
            grown = 0  # another name for bytes already counted
        else:
            grown = size
            counted.add(inode)
        if grown:
            key = categorise(path)
            totals[key] = totals.get(key, 0) + grown
    return totals
