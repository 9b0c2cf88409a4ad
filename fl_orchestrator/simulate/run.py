"""`fl-orchestrator simulate`: the whole job on this machine, against N simulated datasites.

The real daemon and N real datasite processes (the same runner as a live
federation, running the same train function or ClientApp) over a scratch
SyftBox-layout folder. A ``--partition`` function gives each datasite its
share of the data, as ``context.node_config`` settings. ``--slow K`` and
``--flaky K`` make K datasites stragglers or failing (simulate/behaviour.py),
so the timeouts and retries show before going live. It prints one line per
round and writes the report, as the demo does.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_orchestrator.config import JobConfig, load_config
from fl_orchestrator.config.hooks import load_callable, use_python_path
from fl_orchestrator.simulate import behaviour
from fl_orchestrator.simulate.federation import DatasiteSpec, LocalFederation, wait_all
from fl_orchestrator.simulate.job import write_simulation_job
from fl_orchestrator.simulate.pool import POOL_SIZE, PooledDatasite, PoolSpec
from fl_orchestrator.simulate.tiers import write_tiered_jobs

# How much longer than the round timeout a --slow datasite takes.
SLOW_FACTOR = 1.6
RUNNER_KINDS = ("auto", "processes", "threads")
# Past this many datasites, processes cost more than they show (an interpreter and a watcher each).
PROCESSES_UP_TO = 20


@dataclass(frozen=True)
class SimulateSettings:
    """What to simulate: the job, how many datasites, whose code, and which misbehave."""

    config: Path
    datasites: int
    train: str | None = None
    client_app: str | None = None
    evaluate: str | None = None
    partition: str | None = None
    slow: int = 0
    flaky: int = 0
    seed: int = 0
    workdir: Path | None = None
    # "processes": one datasite process each; "threads": in-process runners (simulate/pool.py);
    # "auto": processes up to PROCESSES_UP_TO datasites, threads past that.
    runners: str = "auto"
    # > 0: the job runs as a root over this many region daemons (simulate/tiers.py).
    tiers: int = 0


@dataclass(frozen=True)
class SimulationResult:
    """How the simulation ended, and where its state is (for the report)."""

    code: int
    workdir: Path
    state_dir: Path
    job: str
    num_rounds: int


def simulate(settings: SimulateSettings, out: Any = sys.stdout) -> SimulationResult:
    """Run the simulation; its code is the daemon's exit code."""
    config = load_config(settings.config)
    use_python_path(config.job.python_path)
    if settings.tiers < 0:
        raise ValueError(f"--tiers {settings.tiers}: 0 (one tier) or a number of regions")
    workdir = settings.workdir or Path(tempfile.mkdtemp(prefix="fl-orchestrator-simulate-"))
    if settings.tiers > 0:
        return _simulate_tiered(settings, config, workdir, out)
    job, changes = write_simulation_job(config, settings.datasites, workdir)
    # The datasites find the user's code where the coordinator does: here, and [job] python_path.
    federation = LocalFederation(
        job, workdir / "logs", extra_pythonpath=[Path.cwd(), *config.job.python_path]
    )
    simulated = federation.config
    emails = list(simulated.syftbox.datasites)
    behaviours = _behaviours(len(emails), settings.slow, settings.flaky, settings.seed)
    slow_seconds = simulated.job.round_timeout_seconds * SLOW_FACTOR
    # The datasites find the user's modules in the current folder (extra_pythonpath): so does this process.
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    partition = load_callable(settings.partition, what="--partition") if settings.partition else None
    node_configs = [_node_config(index, len(emails), partition) for index in range(len(emails))]
    in_process = _in_process(settings.runners, len(emails))
    print(
        f"simulating {settings.config}: {len(emails)} datasites, {simulated.job.num_rounds} rounds", file=out
    )
    print(f"  work folder: {workdir}", file=out)
    kind = "in-process runners on a thread pool" if in_process else "one process per datasite"
    print(f"  datasites: {kind}", file=out)
    for change in changes:
        print(f"  {change}", file=out)
    for kind in ("slow", "flaky"):
        named = [email for email, b in zip(emails, behaviours, strict=True) if b == kind]
        if named:
            print(f"  {kind}: {', '.join(named)}", file=out)
    table = _RoundTable(out)
    code = 1
    try:
        if in_process:
            federation.start_pools(
                _pool_specs(settings, simulated, emails, behaviours, node_configs, slow_seconds)
            )
        else:
            specs = [
                _spec(settings, email, behaviours[index], slow_seconds, node_configs[index])
                for index, email in enumerate(emails)
            ]
            # Every datasite's heartbeats and rescans load the one machine: spread them out as N grows.
            federation.start_datasites(
                specs,
                heartbeat_interval_seconds=max(0.5, len(specs) / 40),
                rescan_interval_seconds=max(2.0, len(specs) / 10),
            )
        code = _run_daemon(federation, simulated, table, out)
    finally:
        federation.stop()
    state = simulated.state.state_dir
    print(f"\nthe daemon exited {code}; logs: {workdir / 'logs'}   state: {state}", file=out)
    return SimulationResult(code, workdir, state, simulated.job.name, simulated.job.num_rounds)


def _simulate_tiered(
    settings: SimulateSettings, config: JobConfig, workdir: Path, out: Any
) -> SimulationResult:
    """The job as a root over ``settings.tiers`` region daemons, each with its group of datasites."""
    beats = heartbeat_interval(settings.datasites)
    jobs = write_tiered_jobs(
        config, settings.datasites, settings.tiers, workdir, heartbeat_interval_seconds=beats
    )
    root = LocalFederation(
        jobs.root, workdir / "logs", extra_pythonpath=[Path.cwd(), *config.job.python_path]
    )
    simulated = root.config
    emails = [email for group in jobs.groups for email in group]
    behaviours = dict(
        zip(emails, _behaviours(len(emails), settings.slow, settings.flaky, settings.seed), strict=True)
    )
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    partition = load_callable(settings.partition, what="--partition") if settings.partition else None
    index_of = {email: index for index, email in enumerate(sorted(emails))}
    slow_seconds = config.job.round_timeout_seconds * SLOW_FACTOR
    print(
        f"simulating {settings.config}: {len(emails)} datasites in {settings.tiers} regions,"
        f" {simulated.job.num_rounds} rounds",
        file=out,
    )
    print(f"  work folder: {workdir}", file=out)
    for change in jobs.changes:
        print(f"  {change}", file=out)
    regions = [
        LocalFederation(job, workdir / "logs", extra_pythonpath=root.extra_pythonpath) for job in jobs.regions
    ]
    table = _RoundTable(out)
    code = 1
    try:
        for index, (region, group) in enumerate(zip(regions, jobs.groups, strict=True)):
            region.start_daemon(region.config_path, f"region{index:03d}")
            nodes = [_node_config(index_of[e], len(emails), partition) for e in group]
            region.start_pools(
                _pool_specs(
                    settings, region.config, group, [behaviours[e] for e in group], nodes, slow_seconds, beats
                ),
                name=f"region{index:03d}-pool",
            )
        code = _run_daemon(root, simulated, table, out)
        code = code or wait_all(regions, timeout_seconds=60.0)
    finally:
        for region in regions:
            region.stop()
        root.stop()
    state = simulated.state.state_dir
    print(f"\nthe root daemon exited {code}; logs: {workdir / 'logs'}   state: {state}", file=out)
    return SimulationResult(code, workdir, state, simulated.job.name, simulated.job.num_rounds)


def heartbeat_interval(datasites: int) -> float:
    """Seconds between a simulated datasite's heartbeats: each is a file that some daemon reads."""
    return max(2.0, datasites / 100)


def _behaviours(count: int, slow: int, flaky: int, seed: int) -> list[str]:
    if slow + flaky > count:
        raise ValueError(
            f"--slow {slow} and --flaky {flaky} need {slow + flaky} datasites; there are {count}"
        )
    chosen = random.Random(seed).sample(range(count), slow + flaky)
    kinds = ["normal"] * count
    for position, index in enumerate(chosen):
        kinds[index] = "slow" if position < slow else "flaky"
    return kinds


def _in_process(runners: str, count: int) -> bool:
    if runners not in RUNNER_KINDS:
        raise ValueError(f"--runners {runners!r}: expected one of {', '.join(RUNNER_KINDS)}")
    return runners == "threads" or (runners == "auto" and count > PROCESSES_UP_TO)


def _node_config(index: int, count: int, partition: Any) -> dict[str, Any]:
    node: dict[str, Any] = {"partition-id": index, "num-partitions": count}
    if partition is not None:
        node.update(dict(partition(index, count)))
    return node


def _pool_specs(
    settings: SimulateSettings,
    simulated: JobConfig,
    emails: Sequence[str],
    behaviours: Sequence[str],
    node_configs: Sequence[Mapping[str, Any]],
    slow_seconds: float,
    heartbeat_interval_seconds: float | None = None,
) -> list[PoolSpec]:
    sites = [
        PooledDatasite(email, kind, node)
        for email, kind, node in zip(emails, behaviours, node_configs, strict=True)
    ]
    return [
        PoolSpec(
            root=str(simulated.syftbox.root),
            aggregator=simulated.syftbox.aggregator_email,
            job=simulated.job.name,
            datasites=sites[start : start + POOL_SIZE],
            train=settings.train,
            evaluate=settings.evaluate,
            client_app=settings.client_app,
            slow_seconds=slow_seconds,
            heartbeat_interval_seconds=heartbeat_interval_seconds or heartbeat_interval(len(sites)),
            rescan_interval_seconds=10.0,
        )
        for start in range(0, len(sites), POOL_SIZE)
    ]


def _spec(
    settings: SimulateSettings, email: str, kind: str, slow_seconds: float, node: Mapping[str, Any]
) -> DatasiteSpec:
    env = {behaviour.ENV_BEHAVIOUR: kind, behaviour.ENV_SLOW_SECONDS: str(slow_seconds)}
    args: list[str] = []
    if settings.client_app is not None:
        env[behaviour.ENV_CLIENT_APP] = settings.client_app
        args += ["--client-app", "fl_orchestrator.simulate.behaviour:client_app"]
    else:
        assert settings.train is not None
        env[behaviour.ENV_TRAIN] = settings.train
        args += ["--train", "fl_orchestrator.simulate.behaviour:train"]
    if settings.evaluate is not None:
        env[behaviour.ENV_EVALUATE] = settings.evaluate
        args += ["--evaluate", "fl_orchestrator.simulate.behaviour:evaluate"]
    for key, value in node.items():
        args += ["--node-config-value", f"{key}={_toml_scalar(value)}"]
    return DatasiteSpec(email, settings.train or "", env, tuple(args))


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def _run_daemon(federation: LocalFederation, simulated: JobConfig, table: _RoundTable, out: Any) -> int:
    """The job's daemon to its end, one line per round; its exit code."""
    limit = simulated.job.num_rounds * (simulated.job.round_timeout_seconds + 10) + 120
    limit += simulated.job.available_timeout_seconds
    code = 1
    for event in federation.run_daemon(timeout_seconds=limit):
        name = event.get("event")
        if name == "round.completed":
            table.round(event)
        elif name in ("job.failed", "round.attempt_failed"):
            print(f"  {name}: {event.get('reason', '')}", file=out)
        elif name == "daemon.exit":
            code = int(event["code"])
    return code


class _RoundTable:
    """One line per completed round: who took part, the metrics, how long collecting took."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.metrics: list[str] | None = None

    def round(self, event: Mapping[str, Any]) -> None:
        values = dict(event.get("evaluate_metrics") or {}) or dict(event.get("train_metrics") or {})
        if self.metrics is None:
            self.metrics = sorted(values, key=lambda k: (k != "accuracy", k))[:2]
            heads = ["round", "sent", "ok", "fail", "late", *self.metrics, "collect s"]
            print("\n" + "  ".join(f"{h:>9}" for h in heads) + "  notes", file=self.out)
        cells = [event["round"], event["sent"], event["succeeded"], event["failed"], event["timed_out"]]
        shown = [f"{c:>9}" for c in cells] + [_number(values.get(m)) for m in self.metrics]
        shown.append(f"{float(event.get('collect_seconds', 0.0)):>9.3f}")
        notes = _notes(event)
        print("  ".join(shown) + (f"  {notes}" if notes else ""), file=self.out)


def _number(value: Any) -> str:
    return f"{value:>9.4f}" if isinstance(value, int | float) else f"{'-':>9}"


def _notes(event: Mapping[str, Any]) -> str:
    stragglers: Sequence[str] = event.get("stragglers", [])
    failures: Mapping[str, str] = event.get("failures", {})
    parts = []
    if stragglers:
        parts.append(f"timed out: {', '.join(stragglers)}")
    if failures:
        parts.append("failed: " + ", ".join(f"{k} ({v})" for k, v in failures.items()))
    return "; ".join(parts)
