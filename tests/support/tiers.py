"""Job files for a two-tier federation and its flat twin, over one SyftBox folder."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from support.jobs import job_table, write_job

ROOT_AGGREGATOR = "root@example.org"


def region_email(index: int) -> str:
    """Region ``index``'s email: its aggregator identity and its datasite identity in the root job."""
    return f"region{index}@example.org"


def flat_table(sites: list[str], **job: Any) -> dict[str, Any]:
    """The flat job over every datasite."""
    table = job_table(len(sites), job={"name": "flat", "min_train_nodes": len(sites), **job})
    table["syftbox"]["datasites"] = sites
    return table


def root_table(regions: int, **job: Any) -> dict[str, Any]:
    """The root job: its datasites are the regions."""
    table = job_table(regions, job={"name": "rootjob", "role": "root", "min_train_nodes": regions, **job})
    table["syftbox"]["aggregator_email"] = ROOT_AGGREGATOR
    table["syftbox"]["datasites"] = [region_email(i) for i in range(regions)]
    return table


def region_table(index: int, sites: list[str], root: dict[str, Any], **job: Any) -> dict[str, Any]:
    """Region ``index`` over ``sites``, for the root job ``root`` (the same model and rounds)."""
    table = job_table(
        len(sites),
        job={
            "name": f"region{index}job",
            "role": "region",
            "num_rounds": root["job"]["num_rounds"],
            "min_train_nodes": len(sites),
            **job,
        },
    )
    table["model"] = copy.deepcopy(root["model"])
    table["syftbox"]["aggregator_email"] = region_email(index)
    table["syftbox"]["datasites"] = sites
    table["state"]["state_dir"] = f"state-region{index}"
    table["region"] = {
        "root_aggregator_email": ROOT_AGGREGATOR,
        "root_job": root["job"]["name"],
        "deadline_margin_seconds": 2.0,
        "heartbeat_interval_seconds": 0.5,
    }
    return table


def write_tiered(folder: Path, groups: list[list[str]], **job: Any) -> tuple[Path, list[Path]]:
    """The root job and one region per group of datasites, in ``folder``; their paths."""
    root = root_table(len(groups), **job)
    root["state"]["state_dir"] = "state-root"
    root_path = write_job(folder / "root", {**root, "syftbox": {**root["syftbox"], "root": "../syftbox"}})
    regions = []
    for index, sites in enumerate(groups):
        table = region_table(index, sites, root, **job)
        table["syftbox"]["root"] = "../syftbox"
        regions.append(write_job(folder / f"region{index}", table))
    return root_path, regions
