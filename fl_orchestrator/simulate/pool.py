"""Many simulated datasites in one process: in-process runners on a thread pool.

A thousand datasite processes do not fit on two cores: each is an interpreter
of its own, with its own watcher over the whole folder. Here one process hosts
a share of the datasites. Each is the same ``DatasiteRunner`` a live datasite
runs (same task handling, same result files, same train function or ClientApp),
but they share one watcher, one heartbeat loop and one rescan, and their code
runs on anyio's worker threads. ``simulate`` starts one pool process per
``POOL_SIZE`` datasites (simulate/federation.py); each reads a ``PoolSpec``
written as JSON.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from fl_orchestrator.config.hooks import load_callable
from fl_orchestrator.datasite.client_app import ClientAppRunner
from fl_orchestrator.datasite.runner import DatasiteRunner, RunnerSettings
from fl_orchestrator.datasite.task_watch import TaskPaths, watch_tasks
from fl_orchestrator.simulate.behaviour import BehavingApp, Behaviour, wrap_evaluate, wrap_train
from fl_orchestrator.storage.atomic import atomic_write_text
from fl_orchestrator.wire.layout import JobLayout

log = structlog.get_logger("fl_orchestrator.simulate")

# Datasites per pool process: past this a second process (and core) shares the work.
POOL_SIZE = 500
# Worker threads for the datasites' code, besides one per slow datasite (which holds its thread).
BASE_THREADS = 16
_INBOX = 256


@dataclass(frozen=True)
class PooledDatasite:
    """One simulated datasite in a pool: who it is, how it behaves, its node_config."""

    email: str
    kind: str = "normal"
    node_config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolSpec:
    """What one pool process serves; simulate writes it as JSON (``write``/``read``)."""

    root: str
    aggregator: str
    job: str
    datasites: Sequence[PooledDatasite]
    train: str | None = None
    evaluate: str | None = None
    client_app: str | None = None
    slow_seconds: float = 1.0
    heartbeat_interval_seconds: float = 2.0
    rescan_interval_seconds: float = 10.0

    def write(self, path: Path) -> None:
        """Atomically, as JSON."""
        atomic_write_text(path, json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def read(cls, path: Path) -> PoolSpec:
        """The spec simulate wrote."""
        table = json.loads(path.read_text(encoding="utf-8"))
        table["datasites"] = [PooledDatasite(**entry) for entry in table["datasites"]]
        return cls(**table)


class RunnerPool:
    """The datasites of one ``PoolSpec``, served until every one has seen its job end."""

    def __init__(self, spec: PoolSpec) -> None:
        self.spec = spec
        self.stopping = threading.Event()
        self.layout = JobLayout(Path(spec.root), spec.job, spec.aggregator)
        train = load_callable(spec.train, what="--train") if spec.train else None
        evaluate = load_callable(spec.evaluate, what="--evaluate") if spec.evaluate else None
        app = load_callable(spec.client_app, what="--client-app") if spec.client_app else None
        self.runners: dict[str, DatasiteRunner] = {}
        for site in spec.datasites:
            behaviour = Behaviour(site.kind, spec.slow_seconds, self.stopping)
            settings = RunnerSettings(
                root=Path(spec.root),
                email=site.email,
                aggregator=spec.aggregator,
                job=spec.job,
                train=None,
                node_config=dict(site.node_config),
                heartbeat_interval_seconds=spec.heartbeat_interval_seconds,
                rescan_interval_seconds=spec.rescan_interval_seconds,
            )
            if app is not None:
                client = ClientAppRunner(
                    BehavingApp(app, behaviour), email=site.email, node_config=settings.node_config
                )
                runner = DatasiteRunner(settings, train=client.train, evaluate=client.evaluate)
            else:
                assert train is not None, "a pool runs --train or --client-app"
                runner = DatasiteRunner(
                    settings,
                    train=wrap_train(train, behaviour),
                    evaluate=wrap_evaluate(evaluate) if evaluate else None,
                )
            self.runners[site.email] = runner
        self.paths = TaskPaths(self.layout, self.runners)

    async def run(self) -> None:
        """Serve every datasite until each has seen its job end; cancelled, stop waiting slow ones."""
        slow = sum(1 for site in self.spec.datasites if site.kind == "slow")
        anyio.to_thread.current_default_thread_limiter().total_tokens = BASE_THREADS + slow
        try:
            await self._serve_all()
        finally:
            self.stopping.set()

    async def _serve_all(self) -> None:
        await anyio.to_thread.run_sync(self._prepare_all)
        inboxes: dict[str, ObjectSendStream[Path]] = {}
        send, receive = anyio.create_memory_object_stream[Path](_INBOX)
        watching = anyio.Event()
        async with anyio.create_task_group() as group:
            first = next(iter(self.runners.values()))
            group.start_soon(
                partial(
                    watch_tasks,
                    self.paths,
                    self.layout,
                    first.own_dir,
                    send,
                    watching,
                    debounce_milliseconds=5,
                )
            )
            await watching.wait()
            await anyio.to_thread.run_sync(self._heartbeat_all)
            log.info("simulate.pool_ready", datasites=len(self.runners))
            async with anyio.create_task_group() as serving:
                for email, runner in self.runners.items():
                    inbox, out = anyio.create_memory_object_stream[Path](_INBOX)
                    inboxes[email] = inbox
                    serving.start_soon(self._serve_one, runner, out, inbox)
                group.start_soon(self._route, receive, inboxes)
                group.start_soon(self._heartbeat_forever)
                group.start_soon(self._rescan_forever, inboxes)
            group.cancel_scope.cancel()

    async def _serve_one(
        self, runner: DatasiteRunner, receive: ObjectReceiveStream[Path], inbox: ObjectSendStream[Path]
    ) -> None:
        await runner.serve(receive)
        # Its job has ended: nothing more is routed to it.
        await inbox.aclose()
        log.info("datasite.stopped", datasite=runner.settings.email, reason="the job has ended")

    def _prepare_all(self) -> None:
        for runner in self.runners.values():
            runner.prepare()

    def _heartbeat_all(self) -> None:
        for runner in self.runners.values():
            runner.write_heartbeat()

    async def _heartbeat_forever(self) -> None:
        while True:
            await anyio.sleep(self.spec.heartbeat_interval_seconds)
            await anyio.to_thread.run_sync(self._heartbeat_all)

    async def _rescan_forever(self, inboxes: dict[str, ObjectSendStream[Path]]) -> None:
        while True:
            found = await anyio.to_thread.run_sync(
                lambda: {email: runner.scan() for email, runner in self.runners.items()}
            )
            for email, paths in found.items():
                for path in paths:
                    await _deliver(inboxes[email], path)
            await anyio.sleep(self.spec.rescan_interval_seconds)

    async def _route(
        self, receive: ObjectReceiveStream[Path], inboxes: dict[str, ObjectSendStream[Path]]
    ) -> None:
        """A task to its datasite; a model to each datasite whose task waits; a new folder to all."""
        async with receive:
            async for path in receive:
                email = self.paths.datasite_of(str(path))
                if email is not None:
                    if email in inboxes:
                        await _deliver(inboxes[email], path)
                    continue
                folder = self.paths.is_folder(str(path))
                for name, runner in self.runners.items():
                    if folder or runner.waiting:
                        await _deliver(inboxes[name], path)


async def _deliver(inbox: ObjectSendStream[Path], path: Path) -> None:
    # A datasite whose job has ended serves no more: what is routed to it is dropped.
    with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
        await inbox.send(path)
