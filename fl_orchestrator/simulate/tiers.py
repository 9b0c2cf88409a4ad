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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fl_orchestrator.config import JobConfig, load_config
from fl_orchestrator.config.render import config_to_table
from fl_orchestrator.config.schema import RegionSection
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


def write_tiered_jobs(
    config: JobConfig, datasites: int, regions: int, workdir: Path, *, heartbeat_interval_seconds: float
) -> TieredJobs:
    """Write the root's and the regions' job files under workdir; refuse what cannot run tiered.

    ``heartbeat_interval_seconds``: how often the simulated datasites will write heartbeats;
    the regions' presence_ttl_seconds is raised to three of them if it is shorter.
    """
    if config.job.protocol != "native":
        raise SimulationRefused(f"job.protocol = {config.job.protocol!r}: tiers run the native protocol")
    if not 1 <= regions <= datasites:
        raise SimulationRefused(f"--tiers {regions}: between 1 and --datasites ({datasites})")
    table: dict[str, Any] = config_to_table(config, for_toml=True)
    table.pop("region", None)
    groups = [[site_email(i) for i in range(datasites) if i % regions == r] for r in range(regions)]
    changes: list[str] = []
    margin = RegionSection().deadline_margin_seconds
    root = copy.deepcopy(table)
    root["job"]["role"] = "root"
    root["job"]["round_timeout_seconds"] = (
        config.job.round_timeout_seconds + _MARGINS_IN_ROOT_TIMEOUT * margin
    )
    if config.job.fraction_train < 1.0:
        changes.append(
            f"job.fraction_train = {config.job.fraction_train:g} applies in each region; the root"
            " asks every region every round"
        )
    root["job"]["fraction_train"] = 1.0
    root["syftbox"]["root"] = str(workdir / "syftbox")
    root["syftbox"]["datasites"] = [region_email(r) for r in range(regions)]
    root["state"]["state_dir"] = str(workdir / "state")
    if config.job.fraction_evaluate > 0:
        root["job"]["fraction_evaluate"] = 0.0
        changes.append("job.fraction_evaluate set to 0: regions do not pass evaluation tasks on")
    for key, (wanted, share) in _scale_counts(root["job"], datasites, regions).items():
        changes.append(f"job.{key} = {wanted} becomes {share} ({regions} regions)")
    changes.append(
        f"the root's job.round_timeout_seconds is {root['job']['round_timeout_seconds']:g}: the job's"
        f" plus {_MARGINS_IN_ROOT_TIMEOUT} x the regions' {margin:g} s margin"
    )
    root_path = _write(workdir / "root.toml", root, f"the root of {datasites} datasites in {regions} regions")
    paths = []
    shares: dict[str, tuple[int, list[int]]] = {}
    ttl = max(config.syftbox.presence_ttl_seconds, 3 * heartbeat_interval_seconds)
    if ttl != config.syftbox.presence_ttl_seconds:
        changes.append(
            f"the regions' syftbox.presence_ttl_seconds is {ttl:g}: three heartbeats of {datasites}"
            f" simulated datasites ({heartbeat_interval_seconds:g} s apart)"
        )
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
        region["syftbox"]["presence_ttl_seconds"] = ttl
        region["state"]["state_dir"] = str(workdir / f"state-region{r:03d}")
        region["region"] = {
            "root_aggregator_email": config.syftbox.aggregator_email,
            "root_job": config.job.name,
            "deadline_margin_seconds": margin,
        }
        for key, (wanted, share) in _scale_counts(job, datasites, len(group)).items():
            shares.setdefault(key, (wanted, []))[1].append(share)
        paths.append(_write(workdir / f"region{r:03d}.toml", region, f"region {r} of {regions}"))
    for key, (wanted, values) in shares.items():
        shown = f"{min(values)}" if min(values) == max(values) else f"{min(values)} to {max(values)}"
        changes.append(f"job.{key} = {wanted} becomes {shown} in each region (its share of the datasites)")
    return TieredJobs(root_path, paths, groups, changes)


def _scale_counts(job: dict[str, Any], datasites: int, available: int) -> dict[str, tuple[int, int]]:
    """Set the job's node counts in proportion to ``available`` of ``datasites`` (rounded up).

    Returns what changed: key -> (the job's count, the new count).
    """
    changed = {}
    for key in _NODE_COUNTS:
        wanted = job.get(key)
        if not isinstance(wanted, int):
            continue
        share = min(available, max(1, math.ceil(min(wanted, datasites) * available / datasites)))
        if share != wanted:
            job[key] = share
            changed[key] = (wanted, share)
    return changed


def _write(path: Path, table: dict[str, Any], what: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        path, f"# {what}, written by fl-orchestrator simulate --tiers.\n" + tomli_w.dumps(table)
    )
    load_config(path)  # what its daemon will load: refused here rather than at its start
    return path
