"""Parity with Flower's Message-API strategies, on vectors recorded by tests/tools/make_flower_vectors.py.

Flower is not needed here: the JSON holds the inputs and Flower's outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_orchestrator.aggregation.base import RoundSkipped
from fl_orchestrator.aggregation.registry import build_strategy

VECTORS = json.loads((Path(__file__).parent / "data" / "flower_vectors.json").read_text())
CASES = VECTORS["cases"]


def decode(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    return {name: np.array(a["data"], dtype=a["dtype"]).reshape(a["shape"]) for name, a in arrays.items()}


def test_vectors_came_from_flower_1_42() -> None:
    assert VECTORS["flwr_version"].startswith("1.42.")
    assert {case["strategy"] for case in CASES} >= {
        "fedavg",
        "fedprox",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "multikrum",
        "bulyan",
        "dp_fixed_clipping",
    }


@pytest.mark.parametrize("case", CASES, ids=[case["label"] for case in CASES])
def test_matches_flower(case: dict[str, Any]) -> None:
    strategy = build_strategy(case["strategy"], case["params"])
    for rnd in case["rounds"]:
        sent = decode(rnd["global"])
        strategy.begin_round(rnd["round"], sent)
        assert strategy.round_config(rnd["round"]) == rnd["config"]
        results = [decode(r["arrays"]) for r in rnd["results"]]
        counts = [r["num_examples"] for r in rnd["results"]]
        if strategy.streaming:
            for result, n in zip(results, counts, strict=True):
                strategy.fold(result, n)
        else:
            strategy.aggregate_all(results, counts)
        if rnd["expected"] is None:
            with pytest.raises(RoundSkipped):
                strategy.finish()
            continue
        got = strategy.finish()
        expected = decode(rnd["expected"])
        assert list(got) == list(expected)
        for name, want in expected.items():
            assert got[name].dtype == sent[name].dtype
            assert got[name].shape == want.shape
            np.testing.assert_allclose(
                got[name], want, rtol=1e-6, atol=1e-6, err_msg=f"{case['label']} {name}"
            )
