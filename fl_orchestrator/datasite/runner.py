"""The datasite side: watch for tasks, train with the data owner's function, reply.

The data owner's function is named by an import string and is called as
``train(arrays, config) -> (arrays, num_examples, metrics)``. If it raises,
the aggregator gets a failed result with the exception's type and message
only: no traceback, no data. A Flower ClientApp can stand in for the
functions (``--client-app``, datasite/client_app.py); its failures carry the
first lines of the traceback, as syft-flwr's do.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import structlog
from anyio.abc import ObjectReceiveStream

from fl_orchestrator.config.hooks import load_callable
from fl_orchestrator.core.reasons import Reason, Rejection
from fl_orchestrator.datasite.client_app import ClientAppRunner, node_id_of
from fl_orchestrator.datasite.model_files import ModelNotReady, ModelUnusable, read_model_bytes
from fl_orchestrator.datasite.outputs import (
    TaskContext,
    call_with_context,
    normalise_evaluate_output,
    normalise_train_output,
)
from fl_orchestrator.datasite.task_watch import TaskPaths, watch_tasks
from fl_orchestrator.datasite.waiting import what_we_wait_for
from fl_orchestrator.storage.atomic import atomic_write, atomic_write_text
from fl_orchestrator.wire.frames import FrameLimits
from fl_orchestrator.wire.layout import JOB_ENDED, JobLayout
from fl_orchestrator.wire.messages import (
    RUNNER_SECONDS_METRIC,
    Envelope,
    HeartbeatMessage,
    ModelMessage,
    PartsMessage,
    ResultMessage,
    TaskMessage,
    decode_message,
    encode_heartbeat,
    encode_parts,
    encode_result_frames,
    sha256_of_frames,
)
from fl_orchestrator.wire.parts import part_name, split_frames
from fl_orchestrator.wire.permissions import datasite_permissions

log = structlog.get_logger("fl_orchestrator.datasite")

TrainFunction = Callable[[dict[str, np.ndarray], dict[str, Any]], Any]


@dataclass(frozen=True)
class RunnerSettings:
    """Everything the runner needs; all of it comes from flags."""

    root: Path
    email: str
    aggregator: str
    job: str
    train: str | None
    heartbeat_interval_seconds: float = 2.0
    evaluate: str | None = None
    rescan_interval_seconds: float = 10.0
    debounce_milliseconds: int = 5
    max_model_bytes: int = 4 * 1024**3
    # Results larger than this are written as parts (SyftBox 0.4.0 refuses files over 10 MB).
    part_bytes: int = 8 * 1024 * 1024
    # A Flower ClientApp instead of train/evaluate functions (datasite/client_app.py), and
    # the data owner's own settings for its context.node_config.
    client_app: str | None = None
    node_config: Mapping[str, Any] = field(default_factory=dict)
    # Serve on after the aggregator says the job has ended (by default the runner exits 0).
    keep_running: bool = False
    # Until its first task, what it waits for is logged at start and then this often.
    waiting_log_interval_seconds: float = 300.0


class NoEvaluateFunction(Exception):
    """An evaluation task reached a runner started without --evaluate."""


class DatasiteRunner:
    """Serves one job for one datasite."""

    def __init__(
        self,
        settings: RunnerSettings,
        train: TrainFunction | None = None,
        evaluate: TrainFunction | None = None,
    ) -> None:
        self.settings = settings
        self.layout = JobLayout(settings.root, settings.job, settings.aggregator)
        self.evaluate = evaluate
        if settings.client_app is not None and train is None:
            app = ClientAppRunner(
                load_callable(settings.client_app, what="--client-app"),
                email=settings.email,
                node_config=settings.node_config,
            )
            self.train: TrainFunction = app.train
            self.evaluate = evaluate or app.evaluate
        else:
            self.train = train or load_callable(settings.train or "", what="--train")
        if self.evaluate is None and settings.evaluate:
            self.evaluate = load_callable(settings.evaluate, what="--evaluate")
        self.tasks_dir = self.layout.tasks_dir(settings.email)
        self.paths = TaskPaths(self.layout, (settings.email,))
        self.own_dir = self.layout.app_dir(settings.email)
        self.state = "idle"
        self.current_task: str | None = None  # being trained or written: abandoned if stopped now
        self.done: set[str] = set()
        self.waiting: set[str] = set()
        self._model_cache: tuple[str, dict[str, np.ndarray]] | None = None
        self._ended_seen: dict[str, Any] | None = None
        self._limits = FrameLimits(max_header_bytes=16 * 1024 * 1024, max_elements=2**34)

    async def run(self) -> None:
        """Run until cancelled, or until the job has ended (unless ``keep_running``)."""
        await anyio.to_thread.run_sync(self.prepare)
        send, receive = anyio.create_memory_object_stream[Path](1024)
        watching = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(
                partial(
                    watch_tasks,
                    self.paths,
                    self.layout,
                    self.own_dir,
                    send,
                    watching,
                    debounce_milliseconds=self.settings.debounce_milliseconds,
                )
            )
            # Announced only once tasks are seen as they land (datasite/task_watch.py).
            await watching.wait()
            await anyio.to_thread.run_sync(self.write_heartbeat)
            log.info("datasite.ready", datasite=self.settings.email)
            group.start_soon(self._heartbeat_forever)
            group.start_soon(self._rescan_forever, send.clone())
            group.start_soon(self._say_what_it_waits_for)
            await self.serve(receive)
            group.cancel_scope.cancel()

    async def serve(self, receive: ObjectReceiveStream[Path]) -> None:
        """Handle the paths received until the job has ended (unless ``keep_running``)."""
        async with receive:
            async for received in receive:
                if self.paths.is_folder(str(received)):
                    found = await anyio.to_thread.run_sync(self.scan)
                else:
                    found = [received]
                for path in found:
                    if path.parent != self.tasks_dir and path.name.endswith((".task", JOB_ENDED)):
                        continue  # another datasite's: never this runner's to answer
                    if path.name != JOB_ENDED:
                        await self._handle(path)
                    elif self._job_ended(path) and not self.settings.keep_running:
                        return

    def _job_ended(self, path: Path) -> bool:
        """The aggregator's end-of-job marker: logged once; True if it is there."""
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False  # gone again (a new run started), or still arriving
        if not isinstance(marker, dict) or self._ended_seen == marker:
            return isinstance(marker, dict)
        self._ended_seen = marker
        log.info(
            "datasite.job_ended",
            datasite=self.settings.email,
            outcome=marker.get("outcome"),
            reason=marker.get("reason"),
            run=marker.get("run"),
            hint="exiting" if not self.settings.keep_running else "--keep-running: still serving",
        )
        return True

    def prepare(self) -> None:
        """Make this datasite's folders and permission files (before the first heartbeat)."""
        self.layout.results_dir(self.settings.email).mkdir(parents=True, exist_ok=True)
        for name, text in datasite_permissions(self.settings.aggregator).items():
            atomic_write_text(self.own_dir / name, text)
        log.info(
            "datasite.started",
            datasite=self.settings.email,
            job=self.settings.job,
            tasks_dir=str(self.tasks_dir),
            node_config=dict(self.settings.node_config),  # the data owner's own settings: stay local
        )

    def write_heartbeat(self) -> None:
        """Say this datasite is here, and whether it is training."""
        beat = HeartbeatMessage(
            Envelope(self.settings.job, 0, secrets.token_hex(8), None, time.time(), None), self.state
        )
        atomic_write(self.layout.heartbeat_path(self.settings.email), [encode_heartbeat(beat)], durable=False)

    async def _heartbeat_forever(self) -> None:
        while True:
            await anyio.sleep(self.settings.heartbeat_interval_seconds)
            await anyio.to_thread.run_sync(self.write_heartbeat)

    async def _say_what_it_waits_for(self) -> None:
        """Until the first task arrives: what is missing, at start and every few minutes."""
        while not self.done and not self.waiting:
            waiting = await anyio.to_thread.run_sync(what_we_wait_for, self.layout, self.settings.email)
            if self.done or self.waiting:
                return
            log.info(
                "datasite.waiting",
                datasite=self.settings.email,
                waiting_for=waiting.waiting_for,
                path=waiting.path,
                hint=waiting.hint,
            )
            await anyio.sleep(self.settings.waiting_log_interval_seconds)

    async def _rescan_forever(self, send: Any) -> None:
        while True:
            paths = await anyio.to_thread.run_sync(self.scan)
            for path in paths:
                await send.send(path)
            await anyio.sleep(self.settings.rescan_interval_seconds)

    def scan(self) -> list[Path]:
        """Every task file and the job-ended marker in this datasite's task folder, as found now."""
        try:
            found = sorted(self.tasks_dir.glob("*.task"))
        except OSError:
            return []
        ended = self.tasks_dir / JOB_ENDED
        return [*found, ended] if ended.exists() else found

    async def _handle(self, path: Path) -> None:
        if not path.name.endswith(".task"):
            # A model arrived: tasks that were waiting for it can go now.
            for task_id in sorted(self.waiting):
                await self._handle(self.tasks_dir / f"{task_id}.task")
            return
        task_id = path.name[: -len(".task")]
        if task_id in self.done:
            return
        result_path = self.layout.result_path(self.settings.email, task_id)
        if result_path.exists():
            self.done.add(task_id)
            return
        try:
            task = await anyio.to_thread.run_sync(self._read_task, path)
        except (OSError, Rejection) as exc:
            # Possibly still syncing; the next event or rescan tries again.
            log.warning("task.unreadable", path=str(path), error=str(exc))
            return
        env = task.envelope
        if env.deadline is not None and env.deadline < time.time():
            self.done.add(task_id)
            self.waiting.discard(task_id)
            log.info("task.expired", round=env.round, task=task_id)
            return
        try:
            model = await anyio.to_thread.run_sync(self._load_model, task)
        except ModelNotReady as exc:
            if task_id not in self.waiting:
                log.info("task.waiting_for_model", round=env.round, task=task_id, reason=str(exc))
            self.waiting.add(task_id)
            return
        self.waiting.discard(task_id)
        self.done.add(task_id)
        log.info("task.received", datasite=self.settings.email, round=env.round, task=task_id)
        self.state = "training"
        self.current_task = task_id
        started = time.perf_counter()
        try:
            frames, result = await anyio.to_thread.run_sync(self._train_and_encode, task, model)
            await anyio.to_thread.run_sync(lambda: self._write_result(result_path, result, frames))
        finally:
            self.state = "idle"
            self.current_task = None
        log.info(
            "task.answered",
            datasite=self.settings.email,
            round=env.round,
            ok=result.ok,
            error_type=result.error_type,
            seconds=round(time.perf_counter() - started, 3),
        )

    def _read_task(self, path: Path) -> TaskMessage:
        data = path.read_bytes()
        task = decode_message(data, expect_kind="task", expect_job=self.settings.job, limits=self._limits)
        assert isinstance(task, TaskMessage)
        if task.envelope.message_id != path.name[: -len(".task")]:
            raise Rejection(Reason.BAD_NAME, "task file name and message_id differ")
        return task

    def _load_model(self, task: TaskMessage) -> dict[str, np.ndarray] | ModelUnusable:
        """The task's model, ModelUnusable if it can never be used; raises ModelNotReady."""
        ref = task.model
        if self._model_cache and self._model_cache[0] == ref.sha256:
            return {k: v.copy() for k, v in self._model_cache[1].items()}
        path = (self.layout.aggregator_dir / ref.path).resolve()
        if not path.is_relative_to(self.layout.aggregator_dir.resolve()):
            return ModelUnusable("the model path leaves the aggregator's job folder")
        if ref.nbytes > self.settings.max_model_bytes:
            return ModelUnusable(
                f"the model is {ref.nbytes} bytes; this runner's limit is {self.settings.max_model_bytes}"
            )
        data = read_model_bytes(path, ref)
        try:
            message = decode_message(
                data, expect_kind="model", expect_job=self.settings.job, limits=self._limits
            )
        except Rejection as exc:
            return ModelUnusable(f"the model file is invalid: {exc.reason}: {exc.detail}")
        assert isinstance(message, ModelMessage)
        model = {k: np.array(v) for k, v in message.arrays.items()}
        self._model_cache = (ref.sha256, model)
        return {k: v.copy() for k, v in model.items()}

    def _write_result(self, path: Path, result: ResultMessage, frames: list[Any]) -> None:
        """One file, or parts then the small file standing for them (under a sync's size cap)."""
        nbytes = sum(memoryview(f).nbytes for f in frames)
        part_bytes = self.settings.part_bytes
        if not 0 < part_bytes < nbytes:
            atomic_write(path, frames)
            return
        parts = split_frames(frames, part_bytes)
        for index, chunks in enumerate(parts):
            atomic_write(path.with_name(part_name(path.name, index)), chunks)
        env = result.envelope
        manifest = PartsMessage(
            Envelope(env.job, env.round, secrets.token_hex(16), env.reply_to, time.time(), None),
            len(parts),
            nbytes,
            sha256_of_frames(frames),
        )
        # Written last, so the aggregator looks for parts only once all were written.
        atomic_write(path, [encode_parts(manifest)])

    def _context(self, task: TaskMessage) -> TaskContext:
        settings = self.settings
        return TaskContext(
            email=settings.email,
            node_id=node_id_of(settings.email),
            node_config=dict(settings.node_config),
            round=task.envelope.round,
            task_id=task.envelope.message_id,
            deadline=task.envelope.deadline,
        )

    def _train_and_encode(
        self, task: TaskMessage, model: dict[str, np.ndarray] | ModelUnusable
    ) -> tuple[list[Any], ResultMessage]:
        """Train and encode; any failure becomes an error result, never a dead runner."""
        env = task.envelope
        reply = Envelope(
            self.settings.job, env.round, secrets.token_hex(16), env.message_id, time.time(), None
        )
        try:
            if isinstance(model, ModelUnusable):
                raise model
            if task.action == "evaluate":
                if self.evaluate is None:
                    raise NoEvaluateFunction("this datasite runs no evaluate function (see --evaluate)")
                output = call_with_context(self.evaluate, model, dict(task.config), self._context(task))
                count, scores = normalise_evaluate_output(output)
                scored = ResultMessage(reply, True, count, scores, action="evaluate")
                return encode_result_frames(scored), scored
            reference = {k: v.copy() for k, v in model.items()}
            started = time.perf_counter()
            output = call_with_context(self.train, model, dict(task.config), self._context(task))
            seconds = time.perf_counter() - started
            new_arrays, num_examples, metrics = normalise_train_output(output, reference)
            # The daemon shows this as the datasite's train time (dispatch to result is the round's).
            metrics = {**metrics, RUNNER_SECONDS_METRIC: round(seconds, 6)}
            result = ResultMessage(reply, True, num_examples, metrics, arrays=new_arrays)
            return encode_result_frames(result), result
        except Exception as exc:  # the data owner's code: report type and message only
            log.warning(
                "train.failed",
                datasite=self.settings.email,
                round=env.round,
                error_type=type(exc).__name__,
                error=str(exc)[:500],
            )
            failed = ResultMessage(
                reply, False, 0, {}, type(exc).__name__, str(exc)[:2000], action=task.action
            )
            return encode_result_frames(failed), failed
