"""`fl-orchestratord --server-app PROJECT_DIR`: an unchanged custom-loop ServerApp on the daemon's transport.

A ``main(grid, context)`` ServerApp that runs its own loop (federated
analytics, retrieval) cannot become a job file. This runs it as it is: its
``main`` in a worker thread, given a Flower Grid over our syft-flwr transport
(protocols/syft_flwr/grid.py). One anyio task group is the root: the shared
watcher follows the owners' folders, a feeder turns its paths into presence
and arrived replies for the grid, and SIGTERM/SIGINT close the grid, so a
``send_and_receive`` in progress raises and the ServerApp's thread ends; after
``shutdown_timeout_seconds`` it is abandoned. When ``main`` returns, every
present owner is sent syft-flwr's stop message. ``state_dir/status.json`` shows
the requests sent and replies taken per owner (daemon/server_app_status.py).

No mid-loop crash-resume: the ServerApp's state is its own. After a restart it
runs again from the start. Replies to requests of the earlier run are never
served to it (request names are fresh each run, so they cannot be matched to
the new run's messages); they are left where they are.
"""

from __future__ import annotations

import signal
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import ObjectReceiveStream

from fl_orchestrator.daemon.server_app_status import ServerAppStatus
from fl_orchestrator.intake.watcher import PathBatch, watch_job_files
from fl_orchestrator.protocols.syft_flwr.grid import GridClosed, ReplyBox, SyftFlwrGrid
from fl_orchestrator.protocols.syft_flwr.keys import AggregatorKeys, KeysError
from fl_orchestrator.protocols.syft_flwr.layout import SCHEMA_FILE, SyftFlwrKind, SyftFlwrLayout, SyftFlwrTree
from fl_orchestrator.protocols.syft_flwr.project_import import (
    ImportRefused,
    flower_context,
    load_server_app,
    read_pyproject,
)
from fl_orchestrator.storage.lock import StateLock

log = structlog.get_logger("fl_orchestrator.server_app")

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_REFUSED = 78


@dataclass(frozen=True)
class ServerAppSettings:
    """Where the ServerApp's project, the SyftBox folder and the state folder are; how to talk."""

    project: Path
    syftbox_root: Path
    state_dir: Path
    encryption: bool = True
    server_url: str = "https://syftbox.net"
    reply_limit_bytes: int = 64 * 1024 * 1024
    debounce_milliseconds: int = 5
    rescan_interval_seconds: float = 15.0
    shutdown_timeout_seconds: float = 5.0
    stop_reason: str = "ServerApp finished"


async def run_server_app(settings: ServerAppSettings) -> int:
    """Run the project's ServerApp to its end; the exit code."""
    try:
        project = read_pyproject(settings.project)
        server_app = load_server_app(project)
    except ImportRefused as exc:
        log.error("server_app.refused", why=str(exc))
        return EXIT_REFUSED
    main = getattr(server_app, "_main", None)
    if main is None:
        log.error(
            "server_app.refused",
            why="this ServerApp has no @app.main() function: a strategy-based project runs as a job"
            " (fl-orchestrator init --from-syft-flwr, then fl-orchestratord --config)",
        )
        return EXIT_REFUSED
    target = SyftFlwrLayout(settings.syftbox_root, project.app_name, project.aggregator)
    lock = StateLock(settings.state_dir)
    lock.acquire()
    try:
        keys = _keys(settings, target)
    except KeysError as exc:
        log.error("server_app.refused", why=f"syft_flwr.encryption: {exc}")
        return EXIT_REFUSED
    box = ReplyBox()
    counts: dict[str, dict[str, int]] = {}
    run_id = zlib.crc32(project.app_name.encode())
    grid = SyftFlwrGrid(
        target,
        project.datasites,
        box,
        keys=keys,
        run_id=run_id,
        reply_limit=settings.reply_limit_bytes,
        counts=counts,
    )
    context = flower_context(project.run_config, run_id)
    status = ServerAppStatus(settings.state_dir, project.app_name, run_id, project.datasites)
    encrypted = keys is not None
    log.info(
        "server_app.started", project=str(settings.project), app_name=project.app_name, encrypted=encrypted
    )
    stop_requested = anyio.Event()
    async with anyio.create_task_group() as group:
        send, receive = anyio.create_memory_object_stream[PathBatch](64)
        group.start_soon(
            lambda: watch_job_files(
                SyftFlwrTree(target),
                tuple(project.datasites),
                send,
                debounce_milliseconds=settings.debounce_milliseconds,
                rescan_interval_seconds=settings.rescan_interval_seconds,
            )
        )
        group.start_soon(_feed, receive, target, keys, box, status)
        group.start_soon(_stop_on_signal, stop_requested)
        group.start_soon(status.write_when_changed, counts)
        status.changed()
        outcome = await _run_main(main, grid, context, box, stop_requested, settings.shutdown_timeout_seconds)
        if outcome == "done":
            await anyio.to_thread.run_sync(_send_stop, grid, settings.stop_reason)
        group.cancel_scope.cancel()
    status.state = {"done": "done", "stopped": "stopped"}.get(outcome, "failed")
    if outcome == "failed":
        status.error = "the ServerApp raised (see server_app.raised in the log)"
    await anyio.to_thread.run_sync(status.write, counts)
    lock.release()
    log.info("server_app.finished", outcome=outcome, per_datasite=counts)
    return EXIT_DONE if outcome == "done" else EXIT_FAILED


def _keys(settings: ServerAppSettings, target: SyftFlwrLayout) -> AggregatorKeys | None:
    if not settings.encryption:
        return None
    keys = AggregatorKeys(
        email=target.aggregator,
        datasites_dir=target.datasites_dir,
        state_dir=settings.state_dir,
        server_url=settings.server_url,
    )
    log.info("syft_flwr.keys", done=keys.ensure(), did=str(keys.did_file), keys=str(keys.keys_dir))
    return keys


async def _run_main(
    main: Any,
    grid: SyftFlwrGrid,
    context: Any,
    box: ReplyBox,
    stop_requested: anyio.Event,
    shutdown_seconds: float,
) -> str:
    """The ServerApp's main in a worker thread: done, stopped (a signal closed the grid) or failed."""
    finished = anyio.Event()
    result = ["failed"]

    def call() -> None:
        try:
            main(grid, context)
            result[0] = "done"
        except GridClosed:
            result[0] = "stopped"
        except Exception:
            log.exception("server_app.raised")
        finally:
            anyio.from_thread.run_sync(finished.set)

    async with anyio.create_task_group() as group:
        group.start_soon(lambda: anyio.to_thread.run_sync(call, abandon_on_cancel=True))
        await _first_of(finished, stop_requested)
        if not finished.is_set():
            box.close()  # a send_and_receive in progress raises GridClosed in the ServerApp's thread
            with anyio.move_on_after(shutdown_seconds):
                await finished.wait()
        group.cancel_scope.cancel()
    return result[0] if finished.is_set() else "stopped"


async def _first_of(*events: anyio.Event) -> None:
    """Until any of the events is set."""
    async with anyio.create_task_group() as group:

        async def wait(event: anyio.Event) -> None:
            await event.wait()
            group.cancel_scope.cancel()

        for event in events:
            group.start_soon(wait, event)


async def _feed(
    receive: ObjectReceiveStream[PathBatch],
    target: SyftFlwrLayout,
    keys: AggregatorKeys | None,
    box: ReplyBox,
    status: ServerAppStatus,
) -> None:
    """The watcher's paths become presence and arrived replies for the grid (and the status)."""
    warned: set[str] = set()
    async for batch in receive:
        for path in batch:
            found = target.classify(path)
            if found is None:
                continue
            if found.kind == SyftFlwrKind.PRESENCE and path.name == SCHEMA_FILE:
                if keys is None or keys.has_public_key(found.owner):
                    box.present(found.owner)
                    status.seen(found.owner)
                elif found.owner not in warned:
                    warned.add(found.owner)
                    hint = keys.no_key_hint(found.owner)
                    log.warning("syft_flwr.owner_without_keys", owner=found.owner, hint=hint)
            elif found.kind == SyftFlwrKind.RESPONSE and found.request_id is not None:
                box.arrived(found.request_id, path)
                status.seen(found.owner)


async def _stop_on_signal(stop_requested: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for number in signals:
            log.info("server_app.stopping", signal=signal.Signals(number).name)
            stop_requested.set()
            return


def _send_stop(grid: SyftFlwrGrid, reason: str) -> None:
    try:
        grid.send_stop(reason)
    except Exception:
        log.exception("server_app.stop_not_sent")
