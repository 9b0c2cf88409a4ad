"""`fl-orchestrator simulate --tiers R`: the job as a root over R regions, on this machine.

The job file becomes the root job (``job.role = "root"``); its N simulated
datasites are split into R groups, each served by a region daemon
(``job.role = "region"``, docs/TIERS.md) with the root's model, rounds and
limits. The root sees R datasites, the regions; each region sees its group.
A region's round closes ``region.deadline_margin_seconds`` before the root's,
so the root's round timeout is the job's plus twice that margin.

Every region is one more daemon process, and its datasites run in-process
(simulate/pool.py), so N = 10,000 in 50 regions is about 100 processes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fl_orchestrator.config import JobConfig, load_config
from fl_orchestrator.config.render import config_to_table
from fl_orchestrator.simulate.job import SimulationRefused, site_email
from fl_orchestrator.storage.atomic import atomic_write_text

_NODE_COUNTS = ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")
# What the root's round timeout adds to the job's, in region margins: one for the region to
# answer within, one for the answer to travel.
_MARGINS_IN_ROOT_TIMEOUT = 2


@dataclass(frozen=True)
class TieredJobs:
    """The root's job file, each region's, and which datasites each region serves."""

    root: Path
    regions: list[Path]
    groups: list[list[str]]
    changes: list[str]


def region_email(index: int) -> str:
    """Simulated region number ``index``: its aggregator identity and its datasite in the root job."""
    return f"region-{index:03d}@simulate.local"


def write_tiered_jobs(config: JobConfig, datasites: int, regions: int, workdir: Path) -> TieredJobs:
    """Write the root's and the regions' job files under workdir; refuse what cannot run tiered."""
    if config.job.protocol != "native":
        raise SimulationRefused(f"job.protocol = {config.job.protocol!r}: tiers run the native protocol")
    if not 1 <= regions <= datasites:
        raise SimulationRefused(f"--tiers {regions}: between 1 and --datasites ({datasites})")
    table: dict[str, Any] = config_to_table(config, for_toml=True)
    table.pop("region", None)
    groups = [[site_email(i) for i in range(datasites) if i % regions == r] for r in range(regions)]
    changes: list[str] = []
    margin = 10.0
    root = copy.deepcopy(table)
    root["job"]["role"] = "root"
    root["job"]["round_timeout_seconds"] = (
        config.job.round_timeout_seconds + _MARGINS_IN_ROOT_TIMEOUT * margin
    )
    root["job"]["fraction_train"] = 1.0
    root["syftbox"]["root"] = str(workdir / "syftbox")
    root["syftbox"]["datasites"] = [region_email(r) for r in range(regions)]
    root["state"]["state_dir"] = str(workdir / "state")
    if config.job.fraction_evaluate > 0:
        root["job"]["fraction_evaluate"] = 0.0
        changes.append("job.fraction_evaluate set to 0: regions do not pass evaluation tasks on")
    _lower_counts(root["job"], regions, "regions", changes)
    changes.append(
        f"the root's job.round_timeout_seconds is {root['job']['round_timeout_seconds']:g}: the job's"
        f" plus {_MARGINS_IN_ROOT_TIMEOUT} x the regions' {margin:g} s margin"
    )
    root_path = _write(workdir / "root.toml", root, f"the root of {datasites} datasites in {regions} regions")
    paths = []
    for r, group in enumerate(groups):
        region = copy.deepcopy(table)
        job = region["job"]
        job["name"] = f"{config.job.name}-region{r:03d}"[:64]
        job["role"] = "region"
        job["fraction_evaluate"] = 0.0
        for hook in ("configure_round", "metrics_aggregation"):
            job.pop(hook, None)  # the root's config and metrics rule reach the region's datasites
        region["strategy"] = {"name": "fedavg"}
        region.pop("evaluate", None)
        region["syftbox"]["root"] = str(workdir / "syftbox")
        region["syftbox"]["aggregator_email"] = region_email(r)
        region["syftbox"]["datasites"] = group
        region["state"]["state_dir"] = str(workdir / f"state-region{r:03d}")
        region["region"] = {
            "root_aggregator_email": config.syftbox.aggregator_email,
            "root_job": config.job.name,
            "deadline_margin_seconds": margin,
        }
        _lower_counts(job, len(group), "datasites in a region", changes if r == 0 else [])
        paths.append(_write(workdir / f"region{r:03d}.toml", region, f"region {r} of {regions}"))
    return TieredJobs(root_path, paths, groups, changes)


def _lower_counts(job: dict[str, Any], available: int, what: str, changes: list[str]) -> None:
    for key in _NODE_COUNTS:
        wanted = job.get(key)
        if isinstance(wanted, int) and wanted > available:
            job[key] = available
            changes.append(f"job.{key} = {wanted} lowered to {available} ({available} {what})")


def _write(path: Path, table: dict[str, Any], what: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        path, f"# {what}, written by fl-orchestrator simulate --tiers.\n" + tomli_w.dumps(table)
    )
    load_config(path)  # what its daemon will load: refused here rather than at its start
    return path
