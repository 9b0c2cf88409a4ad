"""Every built-in strategy, selected in job.toml, runs end to end through the daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_daemon import run_federation, scripted_train

from fl_orchestrator.aggregation.registry import STRATEGIES, build_strategy
from fl_orchestrator.config import load_config
from fl_orchestrator.daemon.lifecycle import EXIT_DONE
from fl_orchestrator.storage.models import initial_model

from support import scripted
from support.jobs import job_table, write_job

# In-process federations: left out of `make test-fast`.
pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PARAMS: dict[str, dict[str, Any]] = {
    "fedprox": {"proximal_mu": 0.1},
    "fedavgm": {"server_momentum": 0.9, "server_learning_rate": 0.5},
    "fedadam": {"eta": 0.05},
    "fedtrimmedavg": {"beta": 0.34},
    "multikrum": {"num_nodes_to_select": 2},
    "dp_fixed_clipping": {"clipping_norm": 2.0, "noise_multiplier": 0.1, "strategy": "fedadam"},
}
ROUNDS = 2


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def expected_models(name: str, params: dict[str, Any], model: dict[str, np.ndarray], seed: int) -> list[Any]:
    strategy = build_strategy(name, params, seed=seed)
    models = [model]
    for rnd in range(1, ROUNDS + 1):
        strategy.begin_round(rnd, model)
        updates = [scripted.scripted_update(model, i) for i in range(3)]
        counts = [scripted.num_examples_of(i) for i in range(3)]
        if strategy.streaming:
            for update, n in zip(updates, counts, strict=True):
                strategy.fold(update, n)
        else:
            strategy.aggregate_all(updates, counts)
        model = strategy.finish()
        models.append(model)
    return models


@pytest.mark.parametrize("name", sorted(STRATEGIES))
async def test_strategy_from_job_toml_matches_the_strategy_run_by_hand(tmp_path: Path, name: str) -> None:
    params = PARAMS.get(name, {})
    table = job_table(3, job={"num_rounds": ROUNDS, "min_train_nodes": 3}, strategy={"name": name, **params})
    job = write_job(tmp_path, table)
    config = load_config(job)
    daemon = await run_federation(job, [scripted_train(i) for i in range(3)])
    assert daemon.exit_code == EXIT_DONE
    want = expected_models(name, params, initial_model(config.model), config.job.selection_seed)
    for rnd in range(ROUNDS + 1):
        got = daemon.store.load(rnd)
        for key, value in want[rnd].items():
            scale = max(1.0, float(np.max(np.abs(value))))
            assert float(np.max(np.abs(got[key] - value))) <= 1e-6 * scale, (name, rnd, key)
    if name == "fedprox":
        tasks = list(daemon.layout.tasks_dir("ds0@example.org").glob("*.task"))
        assert tasks and all(b"proximal-mu" in t.read_bytes() for t in tasks)


async def test_multikrum_picks_the_same_result_whatever_the_arrival_order(tmp_path: Path) -> None:
    # Two results tie on every Krum score (k = 1): only a rule, not the upload order, may decide.
    models = []
    for slow in (0, 1):
        folder = tmp_path / f"slow-ds{slow}"
        table = job_table(
            2,
            job={"num_rounds": 1, "min_train_nodes": 2, "min_available_nodes": 2},
            strategy={"name": "multikrum", "num_nodes_to_select": 1},
        )
        job = write_job(folder, table)
        trains = [scripted_train(i, delay_seconds=0.4 if i == slow else 0.0) for i in range(2)]
        daemon = await run_federation(job, trains)
        assert daemon.exit_code == EXIT_DONE
        models.append(daemon.store.load(1))
    for name in models[0]:
        assert np.array_equal(models[0][name], models[1][name]), name
    # And the rule is the datasite order: ds0's update wins the tie.
    config = load_config(tmp_path / "slow-ds0" / "job.toml")
    want = scripted.scripted_update(initial_model(config.model), 0)
    for name, value in want.items():
        assert np.array_equal(models[0][name], value), name
