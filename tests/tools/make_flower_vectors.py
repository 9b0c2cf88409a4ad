"""Regenerate tests/data/flower_vectors.json from Flower's Message-API strategies.

Run it with an interpreter that has Flower installed, outside the project's
environment (the tests themselves never import flwr):

    python3 -m venv /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install 'flwr==1.42.*'
    /tmp/flwr-venv/bin/python tests/tools/make_flower_vectors.py

Only numbers are written: for each case, the model sent each round, every
result with its num_examples, the config Flower put in the train messages and
the arrays Flower's ``aggregate_train`` returned (null when it skipped the
round). Inputs are seeded, so a rerun with the same Flower gives the same file.
"""

from __future__ import annotations

import json
import logging
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower
from flwr.supercore.task_identity import TaskIdentity

OUT = Path(__file__).resolve().parents[1] / "data" / "flower_vectors.json"
SHAPES = {"dense.weight": (3, 4), "dense.bias": (4,), "head": (2, 2, 2)}

# Our strategy name -> Flower's class; parameter names are the same on both sides.
CLASSES = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedavgm": "FedAvgM",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad",
    "fedmedian": "FedMedian",
    "fedtrimmedavg": "FedTrimmedAvg",
    "krum": "Krum",
    "multikrum": "MultiKrum",
    "bulyan": "Bulyan",
}


class FakeGrid:
    """Just enough of a Grid for configure_train to sample n nodes."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def encode(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        name: {"dtype": a.dtype.name, "shape": list(a.shape), "data": [float(x) for x in a.reshape(-1)]}
        for name, a in arrays.items()
    }


def build(name: str, params: dict[str, Any], n: int) -> Any:
    nodes = {"min_train_nodes": n, "min_available_nodes": n, "min_evaluate_nodes": n}
    if name == "dp_fixed_clipping":
        inner_name = params.get("strategy", "fedavg")
        inner = getattr(flower, CLASSES[inner_name])(**params.get("wrapped", {}), **nodes)
        return flower.DifferentialPrivacyServerSideFixedClipping(
            inner,
            noise_multiplier=params["noise_multiplier"],
            clipping_norm=params["clipping_norm"],
            num_sampled_clients=params.get("num_sampled_clients") or n,
        )
    return getattr(flower, CLASSES[name])(**params, **nodes)


def run_case(
    label: str,
    name: str,
    params: dict[str, Any],
    *,
    seed: int,
    clients: int,
    rounds: int = 1,
    dtype: str = "float64",
    outliers: int = 0,
    spread: float = 0.5,
) -> dict[str, Any]:
    """Drive one Flower strategy for a few rounds on seeded inputs and record everything."""
    rng = np.random.default_rng(seed)
    strategy = build(name, params, clients)
    model = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
    weights = [int(w) for w in rng.integers(1, 100, size=clients)]
    recorded = []
    for rnd in range(1, rounds + 1):
        sent = {k: v.copy() for k, v in model.items()}
        messages = list(
            strategy.configure_train(
                rnd,
                ArrayRecord({k: Array(v.copy()) for k, v in sent.items()}),
                ConfigRecord({}),
                FakeGrid(clients),
            )
        )
        config = {k: v for k, v in messages[0].content["config"].items() if k != "server-round"}
        results = []
        for i in range(clients):
            # The last `outliers` clients send far-away models, as Byzantine ones would.
            scale = 50.0 if i >= clients - outliers else spread
            results.append({k: (v + scale * rng.normal(size=v.shape)).astype(dtype) for k, v in sent.items()})
        replies = [
            Message(
                RecordDict(
                    {
                        "arrays": ArrayRecord({k: Array(v.copy()) for k, v in result.items()}),
                        "metrics": MetricRecord({"num-examples": weights[i]}),
                    }
                ),
                reply_to=messages[i],
            )
            for i, result in enumerate(results)
        ]
        aggregated, _ = strategy.aggregate_train(rnd, replies)
        expected = None if aggregated is None else {k: np.asarray(a.numpy()) for k, a in aggregated.items()}
        recorded.append(
            {
                "round": rnd,
                "global": encode(sent),
                "results": [{"arrays": encode(r), "num_examples": weights[i]} for i, r in enumerate(results)],
                "config": config,
                "expected": None if expected is None else encode(expected),
            }
        )
        if expected is not None:
            model = {k: v.astype(dtype) for k, v in expected.items()}
    return {"label": label, "strategy": name, "params": params, "rounds": recorded}


def main() -> None:
    import flwr

    logging.getLogger("flwr").setLevel(logging.WARNING)
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0
    random.seed(0)  # Flower samples nodes with the random module
    cases = [
        run_case("fedavg", "fedavg", {}, seed=1, clients=4, rounds=2),
        run_case("fedavg-float32", "fedavg", {}, seed=2, clients=5, dtype="float32"),
        run_case("fedprox", "fedprox", {"proximal_mu": 0.25}, seed=3, clients=3, rounds=2),
        run_case("fedavgm-defaults", "fedavgm", {}, seed=4, clients=3, rounds=2),
        run_case(
            "fedavgm-momentum",
            "fedavgm",
            {"server_learning_rate": 0.7, "server_momentum": 0.9},
            seed=5,
            clients=4,
            rounds=4,
        ),
        run_case("fedadam-defaults", "fedadam", {}, seed=6, clients=4, rounds=4),
        run_case(
            "fedadam-custom",
            "fedadam",
            {"eta": 0.05, "beta_1": 0.5, "beta_2": 0.9, "tau": 0.01},
            seed=7,
            clients=3,
            rounds=3,
        ),
        run_case("fedadam-float32", "fedadam", {}, seed=8, clients=4, rounds=3, dtype="float32"),
        run_case("fedyogi-defaults", "fedyogi", {}, seed=9, clients=4, rounds=4),
        run_case(
            "fedyogi-custom", "fedyogi", {"eta": 0.1, "beta_2": 0.5, "tau": 0.1}, seed=10, clients=3, rounds=3
        ),
        run_case("fedadagrad-defaults", "fedadagrad", {}, seed=11, clients=4, rounds=4),
        run_case("fedadagrad-custom", "fedadagrad", {"eta": 0.3, "tau": 0.05}, seed=12, clients=3, rounds=3),
        run_case("fedmedian-odd", "fedmedian", {}, seed=13, clients=5, outliers=2),
        run_case("fedmedian-even", "fedmedian", {}, seed=14, clients=6, outliers=1),
        run_case("fedtrimmedavg-defaults", "fedtrimmedavg", {}, seed=15, clients=5, outliers=1),
        run_case("fedtrimmedavg-0.3", "fedtrimmedavg", {"beta": 0.3}, seed=16, clients=7, outliers=2),
        run_case("krum-f1", "krum", {"num_malicious_nodes": 1}, seed=17, clients=6, outliers=1),
        run_case("krum-f2", "krum", {"num_malicious_nodes": 2}, seed=18, clients=7, outliers=2),
        run_case(
            "multikrum",
            "multikrum",
            {"num_malicious_nodes": 1, "num_nodes_to_select": 3},
            seed=19,
            clients=7,
            outliers=1,
        ),
        run_case("bulyan-n7-f1", "bulyan", {"num_malicious_nodes": 1}, seed=20, clients=7, outliers=1),
        run_case("bulyan-n10-f1", "bulyan", {"num_malicious_nodes": 1}, seed=21, clients=10, outliers=1),
        run_case("bulyan-skipped", "bulyan", {"num_malicious_nodes": 1}, seed=22, clients=6),
        run_case(
            "dp-fedavg-clipped",
            "dp_fixed_clipping",
            {"clipping_norm": 1.5, "noise_multiplier": 0.0, "num_sampled_clients": 0},
            seed=23,
            clients=4,
            rounds=2,
        ),
        run_case(
            "dp-fedadam-clipped",
            "dp_fixed_clipping",
            {"clipping_norm": 2.0, "noise_multiplier": 0.0, "strategy": "fedadam", "wrapped": {"eta": 0.05}},
            seed=24,
            clients=3,
            rounds=3,
        ),
    ]
    document = {
        "flwr_version": flwr.__version__,
        "numpy_version": np.__version__,
        "python": sys.version.split()[0],
        "generator": "tests/tools/make_flower_vectors.py",
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=1)
    # One line per number list keeps the file short and its diffs readable.
    text = re.sub(r"\[\s*([-0-9.eE+,\s]*?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    OUT.write_text(text + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
