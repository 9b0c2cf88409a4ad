"""A region: a daemon for its own datasites that answers a root job as one datasite.

Two halves in the daemon's one root task group: the daemon runs the region's
own job (its datasites, state folder, checkpoints and status), and a datasite
runner in the root job, the same runner a data owner runs, answers the root's
tasks. Its train function is the region's round: it hands the root's task to
the daemon (daemon/root_link.py) and returns the weighted mean of the region's
results, their total num_examples and the region's metrics. When the root
announces its end, the runner returns and the region's job ends with it.
"""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np
import structlog

from fl_orchestrator.config.schema import JobConfig
from fl_orchestrator.config.tiers import region_email
from fl_orchestrator.daemon.lifecycle import Daemon
from fl_orchestrator.daemon.root_link import RootLink
from fl_orchestrator.datasite.outputs import TaskContext
from fl_orchestrator.datasite.runner import DatasiteRunner, RunnerSettings

log = structlog.get_logger("fl_orchestrator.region")


class RegionRound:
    """The runner's train function in the root job: one round of the region (in a worker thread)."""

    def __init__(self, link: RootLink) -> None:
        self.link = link

    def __call__(
        self, arrays: dict[str, np.ndarray], config: dict[str, Any], context: TaskContext | None = None
    ) -> tuple[dict[str, np.ndarray], int, dict[str, int | float]]:
        """Ask the region's daemon for round ``context.round``; block this worker thread until answered."""
        assert context is not None, "the runner passes the task's context"
        answer = anyio.from_thread.run(self.link.ask, context.round, arrays, config, context.deadline)
        return answer.arrays, answer.num_examples, answer.metrics


def root_runner_settings(config: JobConfig) -> RunnerSettings:
    """The region's runner in its root job, from the region's job file."""
    region = config.region
    assert region.root_aggregator_email is not None and region.root_job is not None
    return RunnerSettings(
        root=config.syftbox.root,
        email=region_email(config),
        aggregator=region.root_aggregator_email,
        job=region.root_job,
        train=None,
        heartbeat_interval_seconds=region.heartbeat_interval_seconds,
        rescan_interval_seconds=config.daemon.rescan_interval_seconds,
        debounce_milliseconds=config.daemon.watch_debounce_milliseconds,
        part_bytes=config.syftbox.part_bytes,
    )


def make_region(daemon: Daemon) -> Daemon:
    """Give a region's daemon its runner in the root job; returns the daemon, to be run as usual."""
    link = daemon.root_link
    assert link is not None, "only a daemon with job.role = 'region'"
    runner = DatasiteRunner(root_runner_settings(daemon.config), train=RegionRound(link))

    async def serve_root() -> None:
        await runner.run()
        log.info("region.root_ended", root_job=daemon.config.region.root_job)
        await link.root_ended()

    daemon.companions.append(serve_root)
    return daemon
