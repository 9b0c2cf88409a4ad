"""Each built-in strategy against values worked out by hand from its formula, plus the registry."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fl_orchestrator.aggregation.base import RoundSkipped, Strategy, StrategyBase, Weights
from fl_orchestrator.aggregation.fedavg import FedAvg, WeightedSum
from fl_orchestrator.aggregation.krum import closest_mean
from fl_orchestrator.aggregation.registry import STRATEGIES, build_strategy, check_params, min_results


def vec(*values: float, dtype: str = "float64") -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=dtype)}


def run_round(
    strategy: Strategy,
    rnd: int,
    sent: Mapping[str, np.ndarray],
    results: Sequence[Mapping[str, np.ndarray]],
    counts: Sequence[int] | None = None,
) -> Weights:
    counts = list(counts) if counts is not None else [1] * len(results)
    strategy.begin_round(rnd, sent)
    if strategy.streaming:
        for result, n in zip(results, counts, strict=True):
            strategy.fold(result, n)
    else:
        strategy.aggregate_all(results, counts)
    return strategy.finish()


# ---- FedAvg family ---------------------------------------------------------------------


def test_fedavg_weights_by_num_examples() -> None:
    out = run_round(FedAvg(), 1, vec(0, 0), [vec(1, 2), vec(3, 4)], [1, 3])
    np.testing.assert_allclose(out["w"], [2.5, 3.5])


def test_fedavg_keeps_dtype_and_rounds_integers() -> None:
    sent = {"w": np.zeros(2, np.float32), "steps": np.zeros((), np.int64)}
    results = [
        {"w": np.ones(2, np.float32), "steps": np.array(3)},
        {"w": np.zeros(2, np.float32), "steps": np.array(4)},
    ]
    out = run_round(FedAvg(), 1, sent, results, [1, 2])
    assert out["w"].dtype == np.float32 and out["steps"].dtype == np.int64
    assert int(out["steps"]) == 4  # 11/3 = 3.67 rounds to 4


def test_fedavg_without_results_skips_the_round() -> None:
    strategy = FedAvg()
    strategy.begin_round(1, vec(0))
    with pytest.raises(RoundSkipped, match="no results"):
        strategy.finish()


def test_fedprox_sends_mu_and_averages() -> None:
    strategy = build_strategy("fedprox", {"proximal_mu": 0.1})
    assert strategy.round_config(1) == {"proximal-mu": 0.1}
    np.testing.assert_allclose(run_round(strategy, 1, vec(0), [vec(1), vec(3)], [1, 3])["w"], [2.5])


def test_fedavgm_momentum_by_hand() -> None:
    strategy = build_strategy("fedavgm", {"server_learning_rate": 0.5, "server_momentum": 0.9})
    # g = 1 - 0 = 1, v = 1, x = 1 - 0.5 * 1
    out1 = run_round(strategy, 1, vec(1.0), [vec(0.0)])
    np.testing.assert_allclose(out1["w"], [0.5])
    # g = 0, v = 0.9 * 1 + 0, x = 0.5 - 0.5 * 0.9
    out2 = run_round(strategy, 2, out1, [vec(0.5)])
    np.testing.assert_allclose(out2["w"], [0.05])


def test_fedavgm_defaults_is_fedavg() -> None:
    out = run_round(build_strategy("fedavgm"), 1, vec(7.0), [vec(1.0), vec(3.0)], [3, 1])
    np.testing.assert_allclose(out["w"], [1.5])


def test_fedadam_by_hand() -> None:
    strategy = build_strategy("fedadam")
    # Δ = 1: m = 0.1, v = 0.01, η' = 0.1·√(1 - 0.99²)/(1 - 0.9²) = 0.0742460
    out1 = run_round(strategy, 1, vec(0.0), [vec(1.0)])
    np.testing.assert_allclose(out1["w"], [0.0735109], atol=1e-7)
    assert math.isclose(float(out1["w"][0]), 0.1 * math.sqrt(1 - 0.99**2) / 0.19 * 0.1 / 0.101, rel_tol=1e-12)
    # Δ = 0: m = 0.09, v = 0.0099, η' = 0.1·√(1 - 0.99³)/(1 - 0.9³)
    out2 = run_round(strategy, 2, out1, [out1])
    step = 0.1 * math.sqrt(1 - 0.99**3) / (1 - 0.9**3) * 0.09 / (math.sqrt(0.0099) + 1e-3)
    np.testing.assert_allclose(out2["w"], out1["w"] + step, rtol=1e-12)


def test_fedyogi_by_hand() -> None:
    strategy = build_strategy("fedyogi")
    # Δ = 2: m = 0.2, v = 0 - 0.01·4·sign(0 - 4) = 0.04, x = 0.01·0.2/(0.2 + 0.001)
    out1 = run_round(strategy, 1, vec(0.0), [vec(2.0)])
    np.testing.assert_allclose(out1["w"], [0.01 * 0.2 / 0.201], rtol=1e-12)
    # Δ = 0: m = 0.18, v stays 0.04
    out2 = run_round(strategy, 2, out1, [out1])
    np.testing.assert_allclose(out2["w"], out1["w"] + 0.01 * 0.18 / 0.201, rtol=1e-12)


def test_fedadagrad_by_hand() -> None:
    strategy = build_strategy("fedadagrad")
    # Δ = 2: m = Δ = 2, v = 4, x = 0.1·2/(2 + 0.001)
    out1 = run_round(strategy, 1, vec(0.0), [vec(2.0)])
    np.testing.assert_allclose(out1["w"], [0.2 / 2.001], rtol=1e-12)
    # Δ = 1: v = 5, x = x1 + 0.1·1/(√5 + 0.001)
    out2 = run_round(strategy, 2, out1, [{"w": out1["w"] + 1.0}])
    np.testing.assert_allclose(out2["w"], out1["w"] + 0.1 / (math.sqrt(5) + 1e-3), rtol=1e-12)
    assert strategy.state_dict()["m"] is None


# ---- robust strategies -----------------------------------------------------------------


def test_fedmedian_by_hand_ignores_weights() -> None:
    out = run_round(
        build_strategy("fedmedian"), 1, vec(0, 0), [vec(1, 1), vec(5, 2), vec(100, 3)], [100, 1, 1]
    )
    np.testing.assert_allclose(out["w"], [5, 2])
    even = run_round(build_strategy("fedmedian"), 1, vec(0), [vec(1), vec(2), vec(3), vec(100)])
    np.testing.assert_allclose(even["w"], [2.5])


def test_fedtrimmedavg_by_hand() -> None:
    # n = 5, beta = 0.2: cut 1 from each end
    five = [vec(-100), vec(1), vec(2), vec(3), vec(100)]
    np.testing.assert_allclose(run_round(build_strategy("fedtrimmedavg"), 1, vec(0), five)["w"], [2.0])
    # n = 4: int(0.8) = 0, nothing cut
    four = [vec(-100), vec(1), vec(2), vec(100)]
    np.testing.assert_allclose(run_round(build_strategy("fedtrimmedavg"), 1, vec(0), four)["w"], [0.75])


def test_krum_and_multikrum_by_hand() -> None:
    # f = 0, k = n - 2 = 2 closest. Scores: 0 -> 1+9, 1 -> 1+4, 3 -> 4+9, 100 -> 97²+99²
    points = [vec(0), vec(1), vec(3), vec(100)]
    krum = build_strategy("krum")
    np.testing.assert_array_equal(run_round(krum, 1, vec(0), points)["w"], [1.0])
    multikrum = build_strategy("multikrum", {"num_nodes_to_select": 2})
    # keeps results 1 and 0, weighted 1 and 3
    out = run_round(multikrum, 1, vec(0), points, [3, 1, 1, 1])
    np.testing.assert_allclose(out["w"], [0.25])
    assert sorted(multikrum.last_selected) == [0, 1]


def test_closest_mean_by_hand() -> None:
    # median 1; distances 1, 1, 0, 4, 5 -> the three closest are 1, 0, 0
    np.testing.assert_allclose(closest_mean(np.array([[0.0], [0.0], [1.0], [5.0], [6.0]]), 3), [1 / 3])


def test_bulyan_by_hand() -> None:
    honest = [(0.0, 1.0), (0.1, 0.0), (0.3, 0.2), (0.7, 0.9), (1.0, 0.4)]
    results = [vec(*p) for p in honest] + [vec(100, 100), vec(-80, 50)]
    strategy = build_strategy("bulyan", {"num_malicious_nodes": 1})
    # θ = 5 (the honest ones), β = 3. x: median 0.3, closest 0.3, 0.1, 0 ; y: median 0.4, closest 0.4, 0.2, 0
    out = run_round(strategy, 1, vec(0, 0), results)
    np.testing.assert_allclose(out["w"], [0.4 / 3, 0.2])
    assert sorted(strategy.last_selected) == [0, 1, 2, 3, 4]


def test_bulyan_skips_small_rounds_with_the_reason() -> None:
    strategy = build_strategy("bulyan", {"num_malicious_nodes": 1})
    with pytest.raises(RoundSkipped, match=r"at least 4\*num_malicious_nodes \+ 3 = 7 results .* has 6"):
        run_round(strategy, 1, vec(0), [vec(i) for i in range(6)])


# ---- differential privacy --------------------------------------------------------------


def test_dp_clips_by_hand() -> None:
    strategy = build_strategy("dp_fixed_clipping", {"clipping_norm": 1.0, "noise_multiplier": 0.0})
    # [3, 4] has norm 5 -> [0.6, 0.8]; [0.3, 0.4] is inside the ball
    out = run_round(strategy, 1, vec(0, 0), [vec(3, 4), vec(0.3, 0.4)])
    np.testing.assert_allclose(out["w"], [0.45, 0.6])
    assert strategy.last_scales == [0.2, 1.0]


def test_dp_clips_relative_to_the_sent_model_over_whole_model() -> None:
    sent = {"a": np.array([10.0]), "b": np.array([10.0])}
    result = {"a": np.array([13.0]), "b": np.array([14.0])}
    strategy = build_strategy("dp_fixed_clipping", {"clipping_norm": 2.5, "noise_multiplier": 0.0})
    out = run_round(strategy, 1, sent, [result])
    np.testing.assert_allclose([out["a"][0], out["b"][0]], [11.5, 12.0])


def test_dp_noise_has_the_documented_scale_and_is_seeded() -> None:
    sent = {"w": np.zeros(40_000)}
    params = {"clipping_norm": 1.0, "noise_multiplier": 2.0}
    outs = [
        run_round(build_strategy("dp_fixed_clipping", params, seed=7), 1, sent, [sent] * 4) for _ in range(2)
    ]
    np.testing.assert_array_equal(outs[0]["w"], outs[1]["w"])
    assert np.std(outs[0]["w"]) == pytest.approx(2.0 * 1.0 / 4, rel=0.02)
    other = run_round(build_strategy("dp_fixed_clipping", params, seed=8), 1, sent, [sent] * 4)
    assert not np.array_equal(other["w"], outs[0]["w"])
    fixed = run_round(
        build_strategy("dp_fixed_clipping", {**params, "num_sampled_clients": 10}), 1, sent, [sent] * 4
    )
    assert np.std(fixed["w"]) == pytest.approx(0.2, rel=0.02)


def test_dp_wraps_a_configured_strategy() -> None:
    params = {
        "clipping_norm": 10.0,
        "noise_multiplier": 0.0,
        "strategy": "fedprox",
        "wrapped": {"proximal_mu": 2},
    }
    strategy = build_strategy("dp_fixed_clipping", params)
    assert strategy.round_config(3) == {"proximal-mu": 2.0}
    robust = build_strategy("dp_fixed_clipping", {**params, "strategy": "fedmedian", "wrapped": {}})
    assert robust.streaming is False


# ---- registry --------------------------------------------------------------------------

FLOWER_DEFAULTS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedprox": {"proximal_mu": 0.0},
    "fedavgm": {"server_learning_rate": 1.0, "server_momentum": 0.0},
    "fedadam": {"eta": 0.1, "eta_l": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedyogi": {"eta": 0.01, "eta_l": 0.0316, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedadagrad": {"eta": 0.1, "eta_l": 0.1, "tau": 1e-3},
    "fedmedian": {},
    "fedtrimmedavg": {"beta": 0.2},
    "krum": {"num_malicious_nodes": 0},
    "multikrum": {"num_malicious_nodes": 0, "num_nodes_to_select": 1},
    "bulyan": {"num_malicious_nodes": 0},
}


@pytest.mark.parametrize("name", sorted(FLOWER_DEFAULTS))
def test_params_have_flower_names_defaults_and_specs(name: str) -> None:
    info = STRATEGIES[name]
    assert info.name == name
    defaults = info.params_type()
    assert dataclasses.asdict(defaults) == FLOWER_DEFAULTS[name]
    assert info.params_type.__dataclass_params__.frozen  # type: ignore[attr-defined]
    for field in dataclasses.fields(info.params_type):
        assert field.metadata["doc"]
    strategy = build_strategy(name)
    assert strategy.name == name
    assert isinstance(strategy.streaming, bool)


def test_registry_covers_every_strategy() -> None:
    assert set(STRATEGIES) == set(FLOWER_DEFAULTS) | {"dp_fixed_clipping"}
    assert build_strategy("fedavg").name == "fedavg"
    assert build_strategy("krum").streaming is False


def test_the_weighted_sum_multiplies_in_float64_not_in_the_update_dtype() -> None:
    update = {"w": np.full(5, 1.1, dtype=np.float32)}
    total = WeightedSum(update)
    total.add(update, 3.0)
    exact = np.float64(np.float32(1.1)) * 3.0  # 3.3000000715...; a float32 product is 3.3000001907
    assert total.mean64()["w"][0] * 3.0 == exact
    assert total.sums["w"][0] == exact


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("fedtrimmedavg", {"beta": 0.5}, "below 0.5"),
        ("fedadam", {"beta_1": 1.0}, "beta_1 must be below 1"),
        ("fedyogi", {"tau": 0.0}, "tau = 0.0 must be > 0"),
        ("multikrum", {"num_nodes_to_select": 0}, "must be >= 1"),
        ("krum", {"num_malicious_nodes": -1}, "must be >= 0"),
        ("fedavg", {"eta": 1}, "unknown parameter"),
        ("krum", {"num_malicious_nodes": 1.5}, "must be of type int"),
        ("fedadam", {"eta": "fast"}, "must be of type float"),
        ("nope", None, "unknown strategy"),
        ("dp_fixed_clipping", None, "needs parameter"),
        ("dp_fixed_clipping", {"clipping_norm": 0, "noise_multiplier": 1}, "clipping_norm = 0 must be > 0"),
        ("dp_fixed_clipping", {"clipping_norm": 1, "noise_multiplier": 1, "strategy": "x"}, "must be one of"),
        (
            "dp_fixed_clipping",
            {"clipping_norm": 1, "noise_multiplier": 1, "strategy": "fedadam", "wrapped": {"beta_2": 1}},
            "fedadam.beta_2 must be below 1",
        ),
        ("dp_fixed_clipping", {"clipping_norm": 1, "noise_multiplier": 1, "wrapped": {"eta": 1}}, "unknown"),
        ("no.such.module:Thing", None, "cannot load"),
    ],
)
def test_check_params_explains(name: str, params: object, message: str) -> None:
    error = check_params(name, params)
    assert error is not None and message in error
    with pytest.raises(ValueError, match=r"\w"):
        build_strategy(name, params)


def test_check_params_accepts_dataclasses_and_good_values() -> None:
    assert check_params("fedadam", STRATEGIES["fedadam"].params_type(eta=0.05)) is None
    assert check_params("multikrum", {"num_malicious_nodes": 2, "num_nodes_to_select": 3}) is None
    assert min_results("bulyan", {"num_malicious_nodes": 2}) == 11
    assert min_results("fedavg") == 1
    dp = {
        "clipping_norm": 1,
        "noise_multiplier": 1,
        "strategy": "bulyan",
        "wrapped": {"num_malicious_nodes": 1},
    }
    assert min_results("dp_fixed_clipping", dp) == 7


class CountingMean(StrategyBase):
    """A custom strategy defined in a test module: plain unweighted mean."""

    name = "counting-mean"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.rounds = 0

    def begin_round(self, rnd: int, global_model: Mapping[str, np.ndarray]) -> None:
        self.total: dict[str, np.ndarray] = {
            k: np.zeros_like(v, dtype=np.float64) for k, v in global_model.items()
        }
        self.count = 0

    def fold(self, update: Mapping[str, np.ndarray], num_examples: int) -> None:
        for name in self.total:
            self.total[name] += update[name]
        self.count += 1

    def finish(self) -> Weights:
        self.rounds += 1
        return {k: self.scale * v / self.count for k, v in self.total.items()}


def test_custom_strategy_by_import_string() -> None:
    strategy = build_strategy("test_strategies:CountingMean", {"scale": 2.0})
    out = run_round(strategy, 1, vec(0), [vec(1), vec(2)])
    np.testing.assert_allclose(out["w"], [3.0])
    assert check_params("test_strategies:CountingMean", None) is None
    with pytest.raises(TypeError, match="not a strategy"):
        build_strategy("pathlib:PurePath")


def test_example_custom_strategies_run() -> None:
    path = Path(__file__).resolve().parents[1] / "docs" / "examples" / "custom_strategy.py"
    spec = importlib.util.spec_from_file_location("custom_strategy_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()


def test_an_integer_array_is_clipped_the_same_way_at_the_intake_and_on_a_re_read() -> None:
    from fl_orchestrator.aggregation.clipping import ClippedUpdate, clip_update

    model = {"i": np.array([0, 10, -7, 3], dtype=np.int64), "f": np.zeros(3, dtype=np.float32)}
    result = {"i": np.array([5, -3, 8, 4], dtype=np.int64), "f": np.ones(3, dtype=np.float32)}
    kept = clip_update(result, model, 0.3)  # what the intake keeps for streaming strategies
    view = ClippedUpdate(result, model, 0.3)  # what whole-set strategies and DP read
    assert kept["i"].tolist() == [2, 6, -2, 3]  # 10 + 0.3·(-13) = 6.1 -> 6, -7 + 4.5 = -2.5 -> -2
    assert view.read_block("i", 0, 4).tolist() == kept["i"].astype(np.float64).tolist()
    assert view["i"].tolist() == kept["i"].astype(np.float64).tolist()
    assert np.allclose(view.read_block("f", 0, 3), kept["f"])
