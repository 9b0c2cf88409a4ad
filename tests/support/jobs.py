"""Job files for tests, written with tomli-w from a base table plus overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import tomli_w

AGGREGATOR = "agg@example.org"


def site_emails(count: int) -> list[str]:
    """Datasite emails ds0@example.org, ds1@example.org, ..."""
    return [f"ds{i}@example.org" for i in range(count)]


def job_table(num_sites: int = 3, **sections: dict[str, Any]) -> dict[str, Any]:
    """A small valid job; each keyword merges into that section."""
    table: dict[str, Any] = {
        "job": {
            "name": "testjob",
            "num_rounds": 2,
            "round_timeout_seconds": 20.0,
            "fraction_train": 1.0,
            "min_train_nodes": 2,
            "min_available_nodes": num_sites,
            "available_timeout_seconds": 20.0,
            "max_round_retries": 0,
            "train_config": {"lr": 0.1},
        },
        "syftbox": {
            "root": "syftbox",
            "aggregator_email": AGGREGATOR,
            "datasites": site_emails(num_sites),
            "presence_ttl_seconds": 30.0,
        },
        "model": {
            "source": "random",
            "seed": 1,
            "arrays": {
                "w": {"shape": [4, 3], "init": "normal", "scale": 1.0},
                "b": {"shape": [3], "init": "zeros"},
            },
        },
        "state": {"state_dir": "state"},
        "daemon": {"rescan_interval_seconds": 2.0, "watch_debounce_milliseconds": 5},
        "logging": {"format": "json"},
    }
    for name, values in sections.items():
        merged = copy.deepcopy(table.get(name, {}))
        merged.update(values)
        table[name] = merged
    return table


def write_job(folder: Path, table: dict[str, Any]) -> Path:
    """Write a job file into folder; relative paths in it resolve there."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.toml"
    path.write_bytes(tomli_w.dumps(table).encode())
    return path
