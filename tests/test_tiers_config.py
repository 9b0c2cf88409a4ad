"""What a tiered job may combine, refused at load and by `fl-orchestratord --check` (exit 78)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fl_orchestrator.config import ConfigError, load_config
from fl_orchestrator.config.tiers import DECOMPOSABLE

from support.jobs import job_table, site_emails, write_job
from support.tiers import region_table, root_table


def _load(tmp_path: Path, table: dict[str, Any]) -> None:
    load_config(write_job(tmp_path, table))


def test_a_root_and_its_region_load(tmp_path: Path) -> None:
    root = root_table(2)
    _load(tmp_path / "root", root)
    _load(tmp_path / "region", region_table(0, site_emails(3), root))


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_a_root_refuses_strategies_that_do_not_fold_exactly(tmp_path: Path, strategy: str) -> None:
    table = root_table(2)
    table["strategy"] = {"name": strategy}
    table["job"]["min_train_nodes"] = 2
    with pytest.raises(ConfigError) as refused:
        _load(tmp_path, table)
    assert refused.value.key in ("strategy.name", "job.min_train_nodes")


def test_a_root_refuses_dp(tmp_path: Path) -> None:
    table = root_table(2)
    table["strategy"] = {"name": "dp_fixed_clipping", "noise_multiplier": 0.1, "clipping_norm": 1.0}
    with pytest.raises(ConfigError) as refused:
        _load(tmp_path, table)
    assert refused.value.key == "strategy.name"
    assert "folds exactly only into these" in refused.value.expected


@pytest.mark.parametrize("strategy", DECOMPOSABLE)
def test_a_root_takes_every_strategy_that_folds_exactly(tmp_path: Path, strategy: str) -> None:
    table = root_table(2)
    table["strategy"] = {"name": strategy}
    _load(tmp_path, table)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda t: t["region"].pop("root_job"), "region.root_job"),
        (lambda t: t["region"].pop("root_aggregator_email"), "region.root_aggregator_email"),
        (lambda t: t.update(strategy={"name": "fedprox", "proximal_mu": 0.1}), "strategy.name"),
        (lambda t: t["region"].update(email=t["syftbox"]["datasites"][0]), "region.email"),
        (lambda t: t["region"].update(root_job="../etc"), "region.root_job"),
        (lambda t: t["region"].update(root_job=t["job"]["name"]), "region.root_job"),
        (lambda t: t["region"].update(deadline_margin_seconds=-1), "region.deadline_margin_seconds"),
        (lambda t: t["region"].update(root_deadline=3), "region.root_deadline"),
        (lambda t: t["job"].update(fraction_evaluate=0.5), "job.fraction_evaluate"),
        (
            lambda t: t["job"].update(metrics_aggregation="support.hooks:largest_loss"),
            "job.metrics_aggregation",
        ),
        (lambda t: t.update(limits={"max_weight_share": 0.5}), "limits.max_weight_share"),
        (lambda t: t["region"].update(deadline_margin_seconds=20.0), "region.deadline_margin_seconds"),
    ],
)
def test_a_careless_region_is_refused_with_the_key_named(tmp_path: Path, change: Any, key: str) -> None:
    table = region_table(0, site_emails(3), root_table(2))
    change(table)
    with pytest.raises(ConfigError) as refused:
        _load(tmp_path, table)
    assert refused.value.key == key


def test_region_keys_without_the_region_role_are_refused(tmp_path: Path) -> None:
    table = job_table(3)
    table["region"] = {"root_job": "rootjob"}
    with pytest.raises(ConfigError) as refused:
        _load(tmp_path, table)
    assert refused.value.key == "region.root_job"


@pytest.mark.integration  # a real process: out of make test-fast, in make test
def test_the_daemon_refuses_a_robust_root_at_check_with_exit_78(tmp_path: Path) -> None:
    table = root_table(4)
    table["strategy"] = {"name": "fedmedian"}
    job = write_job(tmp_path, table)
    done = subprocess.run(
        [sys.executable, "-m", "fl_orchestrator.cli.daemon_main", "--config", str(job), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 78
    assert "strategy.name = 'fedmedian'" in done.stderr
    assert "docs/TIERS.md" in done.stderr


@pytest.mark.integration
@pytest.mark.parametrize(
    ("tiers", "says"), [("-1", "--tiers -1: 0 (one tier)"), ("7", "--tiers 7: between 1 and --datasites (6)")]
)
def test_simulate_refuses_a_careless_tiers_flag(tmp_path: Path, tiers: str, says: str) -> None:
    job = write_job(tmp_path, job_table(3))
    command = [sys.executable, "-m", "fl_orchestrator.cli.tool_main", "simulate", "--config", str(job)]
    command += ["--datasites", "6", "--tiers", tiers, "--train", "support.sim_code:train"]
    command += ["--workdir", str(tmp_path / "work")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert says in done.stderr
    assert not list((tmp_path / "work").glob("*.toml"))  # nothing half-written


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda t: t["job"].update(fraction_evaluate=0.5), "job.fraction_evaluate"),
        (lambda t: t.update(limits={"max_weight_share": 0.5}), "limits.max_weight_share"),
    ],
)
def test_a_root_refuses_what_breaks_the_flat_mean(tmp_path: Path, change: Any, key: str) -> None:
    table = root_table(2)
    change(table)
    with pytest.raises(ConfigError) as refused:
        _load(tmp_path, table)
    assert refused.value.key == key
