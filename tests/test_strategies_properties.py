"""Properties of the strategies: hypothesis-driven invariants, chunking, memmap inputs, state round-trips."""

from __future__ import annotations

import tracemalloc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_orchestrator.aggregation.base import Strategy, Weights
from fl_orchestrator.aggregation.chunks import layout_of
from fl_orchestrator.aggregation.dp import DifferentialPrivacyFixedClipping, decode_rng, encode_rng
from fl_orchestrator.aggregation.fedavg import FedAvg
from fl_orchestrator.aggregation.krum import Bulyan, Krum, MultiKrum, pairwise_sq_distances
from fl_orchestrator.aggregation.registry import STRATEGIES, build_strategy
from fl_orchestrator.aggregation.robust import FedMedian, FedTrimmedAvg

FAST = settings(max_examples=40, deadline=None, derandomize=True)
SHAPES = {"a": (3, 2), "b": (5,)}


def params_for(name: str) -> dict[str, Any] | None:
    if name == "dp_fixed_clipping":
        return {"clipping_norm": 2.0, "noise_multiplier": 0.5, "strategy": "fedadam"}
    return None


def run_round(
    strategy: Strategy,
    rnd: int,
    sent: Mapping[str, np.ndarray],
    results: Sequence[Mapping[str, np.ndarray]],
    counts: Sequence[int],
) -> Weights:
    strategy.begin_round(rnd, sent)
    if strategy.streaming:
        for result, n in zip(results, counts, strict=True):
            strategy.fold(result, n)
    else:
        strategy.aggregate_all(results, counts)
    return strategy.finish()


def model(rng: np.random.Generator, scale: float = 1.0, dtype: str = "float64") -> dict[str, np.ndarray]:
    return {k: (scale * rng.normal(size=s)).astype(dtype) for k, s in SHAPES.items()}


# ---- invariants ------------------------------------------------------------------------


@FAST
@given(
    seed=st.integers(0, 2**32 - 1), n=st.integers(1, 6), weights=st.lists(st.integers(1, 10**6), min_size=6)
)
def test_fedavg_of_identical_updates_is_that_update(seed: int, n: int, weights: list[int]) -> None:
    rng = np.random.default_rng(seed)
    update = model(rng, scale=1e3)
    out = run_round(FedAvg(), 1, model(rng), [update] * n, weights[:n])
    for name in update:
        np.testing.assert_allclose(out[name], update[name], rtol=1e-12)


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_robust_strategies_of_identical_updates_return_it(name: str) -> None:
    rng = np.random.default_rng(0)
    update = model(rng)
    out = run_round(build_strategy(name), 1, model(rng), [update] * 7, [1, 2, 3, 4, 5, 6, 7])
    for key in update:
        np.testing.assert_allclose(out[key], update[key], rtol=1e-15)


@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(3, 8), data=st.data())
def test_every_strategy_ignores_arrival_order(seed: int, n: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    sent = model(rng)
    results = [model(rng) for _ in range(n)]
    counts = [int(c) for c in rng.integers(1, 50, size=n)]
    order = data.draw(st.permutations(range(n)))
    for name in STRATEGIES:
        if name == "bulyan" and n < 7:
            continue
        a = run_round(build_strategy(name, params_for(name), seed=3), 1, sent, results, counts)
        b = run_round(
            build_strategy(name, params_for(name), seed=3),
            1,
            sent,
            [results[i] for i in order],
            [counts[i] for i in order],
        )
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=name)


honest_values = st.floats(-10, 10, allow_nan=False)
outlier_values = st.one_of(st.floats(-1e300, 1e300, allow_nan=False), st.sampled_from([np.inf, -np.inf]))


@FAST
@given(
    honest=st.lists(st.lists(honest_values, min_size=4, max_size=4), min_size=3, max_size=9),
    outliers=st.lists(st.lists(outlier_values, min_size=4, max_size=4), min_size=0, max_size=8),
)
def test_median_ignores_a_minority_of_outliers_of_any_size(
    honest: list[list[float]], outliers: list[list[float]]
) -> None:
    outliers = outliers[: len(honest) - 1]  # strictly fewer outliers than honest results
    rows = np.array(honest + outliers, dtype=np.float64)
    out = run_round(FedMedian(), 1, {"w": np.zeros(4)}, [{"w": r} for r in rows], [1] * len(rows))["w"]
    low, high = np.min(honest, axis=0), np.max(honest, axis=0)
    assert np.all(out >= low) and np.all(out <= high)


@FAST
@given(
    honest=st.lists(st.lists(honest_values, min_size=3, max_size=3), min_size=2, max_size=10),
    outliers=st.lists(st.lists(outlier_values, min_size=3, max_size=3), min_size=0, max_size=4),
    beta=st.floats(0.0, 0.49),
)
def test_trimmed_mean_ignores_up_to_its_cut_of_outliers(
    honest: list[list[float]], outliers: list[list[float]], beta: float
) -> None:
    # Keep as many outliers as are cut from each end of the final set.
    while len(outliers) > int(beta * (len(honest) + len(outliers))):
        outliers = outliers[:-1]
    rows = np.array(honest + outliers, dtype=np.float64)
    out = run_round(FedTrimmedAvg(beta), 1, {"w": np.zeros(3)}, [{"w": r} for r in rows], [1] * len(rows))[
        "w"
    ]
    low, high = np.min(honest, axis=0), np.max(honest, axis=0)
    tolerance = 1e-9 * (1 + np.abs(low) + np.abs(high))
    assert np.all(out >= low - tolerance) and np.all(out <= high + tolerance)


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    f=st.integers(0, 3),
    extra=st.integers(0, 3),
    collude=st.booleans(),
    magnitude=st.floats(1e2, 1e6),
)
def test_krum_never_picks_an_outlier_when_n_is_at_least_2f_plus_3(
    seed: int, f: int, extra: int, collude: bool, magnitude: float
) -> None:
    rng = np.random.default_rng(seed)
    n = 2 * f + 3 + extra
    honest = [{k: rng.uniform(0, 1, size=s) for k, s in SHAPES.items()} for _ in range(n - f)]
    direction = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    outliers = []
    for _ in range(f):
        if not collude:
            direction = {k: rng.normal(size=s) for k, s in SHAPES.items()}
        norm = np.sqrt(sum(float(np.sum(v * v)) for v in direction.values()))
        outliers.append({k: 0.5 + magnitude * v / norm for k, v in direction.items()})
    results = honest + outliers
    order = rng.permutation(n)
    shuffled = [results[i] for i in order]
    for strategy in (Krum(f), MultiKrum(f, n - f)):
        run_round(strategy, 1, honest[0], shuffled, [1] * n)
        assert all(order[i] < n - f for i in strategy.last_selected)


# ---- chunked computations equal numpy on stacked arrays --------------------------------


def stacked(results: Sequence[Mapping[str, np.ndarray]], name: str) -> np.ndarray:
    return np.stack([np.asarray(r[name], dtype=np.float64) for r in results])


def bulyan_reference(results: list[dict[str, np.ndarray]], f: int) -> dict[str, np.ndarray]:
    flat = np.stack([np.concatenate([r[k].reshape(-1) for k in SHAPES]) for r in results])
    distances = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)
    n = len(results)
    k = max(1, n - f - 2)
    scores = [np.sort(np.delete(distances[i], i))[:k].sum() for i in range(n)]
    theta = n - 2 * f
    beta = theta - 2 * f
    chosen = flat[np.argsort(scores, kind="stable")[:theta]]
    median = np.median(chosen, axis=0)
    order = np.argsort(np.abs(chosen - median), axis=0, kind="stable")[:beta]
    values = np.take_along_axis(chosen, order, axis=0).mean(axis=0)
    out, start = {}, 0
    for name, shape in SHAPES.items():
        size = int(np.prod(shape))
        out[name] = values[start : start + size].reshape(shape)
        start += size
    return out


@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 9), chunk=st.integers(1, 7), beta=st.floats(0, 0.49))
def test_chunked_statistics_equal_the_stacked_reference(seed: int, n: int, chunk: int, beta: float) -> None:
    rng = np.random.default_rng(seed)
    sent = model(rng)
    results = [model(rng) for _ in range(n)]
    median = run_round(FedMedian(chunk_elements=chunk), 1, sent, results, [1] * n)
    trimmed = run_round(FedTrimmedAvg(beta, chunk_elements=chunk), 1, sent, results, [1] * n)
    cut = int(beta * n)
    for name in SHAPES:
        stack = stacked(results, name)
        np.testing.assert_array_equal(median[name], np.median(stack, axis=0))
        reference = np.sort(stack, axis=0)[cut : n - cut].mean(axis=0)
        np.testing.assert_allclose(trimmed[name], reference, rtol=1e-9, atol=1e-12)
    flat = np.stack([np.concatenate([r[k].reshape(-1) for k in SHAPES]) for r in results])
    brute = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(pairwise_sq_distances(results, layout_of(sent), chunk), brute, rtol=1e-12)


@FAST
@given(seed=st.integers(0, 2**32 - 1), f=st.integers(0, 2), extra=st.integers(0, 3), chunk=st.integers(1, 5))
def test_chunked_bulyan_equals_the_stacked_reference(seed: int, f: int, extra: int, chunk: int) -> None:
    rng = np.random.default_rng(seed)
    n = 4 * f + 3 + extra
    results = [model(rng) for _ in range(n)]
    out = run_round(Bulyan(f, chunk_elements=chunk), 1, results[0], results, [1] * n)
    reference = bulyan_reference(results, f)
    for name in SHAPES:
        np.testing.assert_allclose(out[name], reference[name], rtol=1e-12)


# ---- memmap-backed inputs ---------------------------------------------------------------


def to_memmaps(results: list[dict[str, np.ndarray]], folder: Path) -> list[dict[str, np.ndarray]]:
    mapped = []
    for i, result in enumerate(results):
        arrays = {}
        for name, array in result.items():
            path = folder / f"{i}-{name}.bin"
            array.tofile(path)
            arrays[name] = np.memmap(path, dtype=array.dtype, mode="r", shape=array.shape)
        mapped.append(arrays)
    return mapped


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_memmap_inputs_give_the_in_memory_result(name: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    sent = model(rng, dtype="float32")
    results = [model(rng, dtype="float32") for _ in range(7)]
    counts = [3, 1, 4, 1, 5, 9, 2]
    in_memory = run_round(build_strategy(name, params_for(name), seed=1), 1, sent, results, counts)
    mapped = to_memmaps(results, tmp_path)
    from_files = run_round(build_strategy(name, params_for(name), seed=1), 1, sent, mapped, counts)
    for key in sent:
        assert from_files[key].dtype == np.float32 and not isinstance(from_files[key], np.memmap)
        np.testing.assert_array_equal(from_files[key], in_memory[key])


def test_dp_over_a_whole_set_strategy_clips_lazily_per_chunk(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    sent = model(rng)
    results = to_memmaps([model(rng, scale=5.0) for _ in range(5)], tmp_path)
    dp = DifferentialPrivacyFixedClipping(
        FedMedian(chunk_elements=2), clipping_norm=1.0, noise_multiplier=0.0, chunk_elements=3
    )
    out = run_round(dp, 1, sent, results, [1] * 5)
    assert not dp.streaming
    scales = dp.last_scales
    for name in SHAPES:
        clipped = np.stack(
            [
                sent[name] + s * (np.asarray(r[name]) - sent[name])
                for r, s in zip(results, scales, strict=True)
            ]
        )
        np.testing.assert_allclose(out[name], np.median(clipped, axis=0), rtol=1e-12)


# ---- a small msgpack codec: state_dict() must survive the trip the shell makes it take --------

NDARRAY = 1  # msgpack extension code: [dtype name, shape, little-endian bytes]


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False)
        payload = msgpack.packb([value.dtype.name, list(value.shape), array.tobytes()])
        return msgpack.ExtType(NDARRAY, payload)
    raise TypeError(f"strategy state holds a {type(value).__name__}")


def _decode(code: int, data: bytes) -> Any:
    assert code == NDARRAY
    dtype, shape, raw = msgpack.unpackb(data)
    # Read-only on purpose: strategies must copy what they load.
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def pack_state(state: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(state, default=_encode)
    return packed


def unpack_state(data: bytes) -> dict[str, Any]:
    state: dict[str, Any] = msgpack.unpackb(data, ext_hook=_decode, strict_map_key=True)
    return state


def test_rng_state_survives_msgpack() -> None:
    rng = np.random.default_rng(123)
    rng.normal(size=5)
    restored = decode_rng(unpack_state(pack_state({"rng": encode_rng(rng)}))["rng"])
    np.testing.assert_array_equal(restored.normal(size=5), rng.normal(size=5))


# ---- state survives a restart -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("fedavgm", {"server_learning_rate": 0.8, "server_momentum": 0.9}),
        ("fedadam", None),
        ("fedyogi", None),
        ("fedadagrad", None),
        ("dp_fixed_clipping", {"clipping_norm": 1.0, "noise_multiplier": 1.0, "strategy": "fedyogi"}),
        ("fedmedian", None),
    ],
)
def test_state_round_trips_through_msgpack(name: str, params: dict[str, Any] | None) -> None:
    rng = np.random.default_rng(11)
    sent = model(rng, dtype="float32")
    rounds = [[model(rng, dtype="float32") for _ in range(3)] for _ in range(3)]
    live = build_strategy(name, params, seed=4)
    x = run_round(live, 1, sent, rounds[0], [1, 2, 3])
    saved = pack_state(live.state_dict())
    restarted = build_strategy(name, params, seed=999)  # the seed must not matter after a restore
    restarted.load_state_dict(unpack_state(saved))
    for rnd, results in enumerate(rounds[1:], start=2):
        expected = run_round(live, rnd, x, results, [1, 2, 3])
        got = run_round(restarted, rnd, x, results, [1, 2, 3])
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
        x = expected
    assert unpack_state(pack_state(restarted.state_dict())).keys() == live.state_dict().keys()


def test_failed_round_leaves_optimizer_state_untouched() -> None:
    strategy = build_strategy("fedadam")
    sent = {"w": np.zeros(3)}
    run_round(strategy, 1, sent, [{"w": np.ones(3)}], [1])
    before = pack_state(strategy.state_dict())
    strategy.begin_round(2, sent)
    with pytest.raises(ValueError):
        strategy.fold({"w": np.ones(4)}, 1)
    strategy.begin_round(2, sent)  # the retried attempt
    with pytest.raises(ValueError, match="no results"):
        strategy.finish()
    assert pack_state(strategy.state_dict()) == before


def whole_set(name: str, chunk: int) -> Strategy:
    if name == "fedmedian":
        return FedMedian(chunk_elements=chunk)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(0.2, chunk_elements=chunk)
    if name == "multikrum":
        return MultiKrum(1, 4, chunk_elements=chunk)
    if name == "bulyan":
        return Bulyan(1, chunk_elements=chunk)
    inner = FedMedian(chunk_elements=chunk)
    return DifferentialPrivacyFixedClipping(
        inner, clipping_norm=1.0, noise_multiplier=0.0, chunk_elements=chunk
    )


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "multikrum", "bulyan", "dp_fixed_clipping"])
def test_whole_set_strategies_never_stack_whole_models(name: str, tmp_path: Path) -> None:
    size, chunk, n = 1 << 19, 1 << 12, 8  # 2 MiB per float32 update; a float64 block is 256 KiB
    rng = np.random.default_rng(2)
    sent = {"w": rng.normal(size=size).astype(np.float32)}
    results = to_memmaps([{"w": rng.normal(size=size).astype(np.float32)} for _ in range(n)], tmp_path)
    strategy = whole_set(name, chunk)
    strategy.begin_round(1, sent)
    tracemalloc.start()
    try:
        strategy.aggregate_all(results, [1] * n)
        out = strategy.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out["w"].dtype == np.float32
    # The 2 MiB output plus a few chunk-sized blocks; stacking the updates would take 32 MiB.
    assert peak < size * 4 + 16 * n * chunk * 8, peak
