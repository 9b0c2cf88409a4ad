"""A job file turned into its local simulation: the same job, N made-up datasites, a scratch folder.

Everything the job says is kept (rounds, timeouts, strategy, model, hooks,
limits) except where the federation is: the SyftBox root and the state
folder move under the simulation's work folder, and the datasites become
``sim-0000@simulate.local`` ... A node count the job asks for that N cannot
meet (``min_available_nodes`` and the like) is lowered to N, and said so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from fl_orchestrator.config import JobConfig, load_config
from fl_orchestrator.config.render import config_to_table
from fl_orchestrator.storage.atomic import atomic_write_text

_NODE_COUNTS = ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes")


class SimulationRefused(Exception):
    """This job cannot be simulated; the message says why."""


def site_email(index: int) -> str:
    """The simulated datasite number ``index``."""
    return f"sim-{index:04d}@simulate.local"


def write_simulation_job(config: JobConfig, datasites: int, workdir: Path) -> tuple[Path, list[str]]:
    """Write the simulation's job file under workdir; return it and the changes worth saying."""
    if config.job.protocol != "native":
        raise SimulationRefused(
            f"job.protocol = {config.job.protocol!r}: simulate runs the native protocol's datasites;"
            " a syft-flwr project simulates with syft-flwr's own run_simulation"
        )
    if datasites < 1:
        raise SimulationRefused(f"--datasites {datasites}: at least 1")
    table: dict[str, Any] = config_to_table(config, for_toml=True)
    table["syftbox"]["root"] = str(workdir / "syftbox")
    table["syftbox"]["datasites"] = [site_email(i) for i in range(datasites)]
    table["state"]["state_dir"] = str(workdir / "state")
    changes = []
    for key in _NODE_COUNTS:
        wanted = table["job"].get(key)
        if isinstance(wanted, int) and wanted > datasites:
            table["job"][key] = datasites
            changes.append(f"job.{key} = {wanted} lowered to {datasites}: only {datasites} datasites")
    path = workdir / "job.toml"
    workdir.mkdir(parents=True, exist_ok=True)
    header = f"# The simulation of {config.source_path}: {datasites} datasites, in {workdir}.\n"
    atomic_write_text(path, header + tomli_w.dumps(table))
    load_config(path)  # what the daemon will load: refused here rather than at its start
    return path, changes
