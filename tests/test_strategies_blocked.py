"""The blocked kernels of the whole-set strategies against their plain definitions.

Median and trimmed mean are read off sorted blocks (orderstats.py) and Krum's
distances come from a Gram matrix (krum.py); these tests hold them to numpy on
the stacked arrays, for random shapes, numbers of results and block sizes, and
with many ties (values drawn from a few integers).
"""

from __future__ import annotations

import functools
import tracemalloc
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_orchestrator.aggregation import chunks, orderstats
from fl_orchestrator.aggregation.chunks import block_columns, layout_of
from fl_orchestrator.aggregation.krum import (
    Bulyan,
    Krum,
    MultiKrum,
    krum_scores,
    pairwise_sq_distances,
    select_multikrum,
)
from fl_orchestrator.aggregation.robust import FedMedian, FedTrimmedAvg

FAST = settings(max_examples=60, deadline=None, derandomize=True)


def random_block(seed: int, n: int, columns: int, ties: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if ties:
        return rng.integers(-3, 4, size=(n, columns)).astype(np.float64)
    return rng.normal(size=(n, columns)) * 10.0 ** rng.integers(-3, 4, size=(n, 1))


def sequential_mean(rows: np.ndarray) -> np.ndarray:
    """Rows added one after the other, divided by their count: np.mean over axis 0, spelled out."""
    return np.asarray(functools.reduce(np.add, [row.copy() for row in rows]) / len(rows))


def run_round(
    strategy: FedMedian | FedTrimmedAvg | MultiKrum | Bulyan,
    sent: Mapping[str, np.ndarray],
    results: Sequence[Mapping[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    strategy.begin_round(1, sent)
    strategy.aggregate_all(results, [1] * len(results))
    return strategy.finish()


# ---- order statistics on one block ------------------------------------------------------


@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), columns=st.integers(1, 50), ties=st.booleans())
def test_blocked_median_is_np_median(seed: int, n: int, columns: int, ties: bool) -> None:
    block = random_block(seed, n, columns, ties)
    np.testing.assert_array_equal(orderstats.median(block), np.median(block, axis=0))


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 40),
    columns=st.integers(1, 50),
    beta=st.floats(0.0, 0.49),
    ties=st.booleans(),
)
def test_trimmed_mean_is_the_sorted_slice_definition(
    seed: int, n: int, columns: int, beta: float, ties: bool
) -> None:
    block = random_block(seed, n, columns, ties)
    cut = int(beta * n)
    got = orderstats.trimmed_mean(block, beta)
    if cut == 0:
        np.testing.assert_array_equal(got, block.mean(axis=0))
    else:
        # Kept values added in ascending order: the sorted-slice definition, bit for bit.
        np.testing.assert_array_equal(got, sequential_mean(np.sort(block, axis=0)[cut : n - cut]))
    np.testing.assert_allclose(
        got, np.sort(block, axis=0)[cut : n - cut].mean(axis=0), rtol=1e-12, atol=1e-12
    )


def closest_mean_reference(block: np.ndarray, beta: int) -> np.ndarray:
    """Per column, by brute force: sort by distance to the median, ties to the lower value."""
    out = np.empty(block.shape[1])
    for column in range(block.shape[1]):
        values = np.sort(block[:, column])
        middle = np.median(values)
        keys = sorted(range(len(values)), key=lambda i: (abs(values[i] - middle), values[i]))
        kept = np.sort(values[keys[:beta]])
        out[column] = sequential_mean(kept[:, None])[0]
    return out


@FAST
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 25), columns=st.integers(1, 30), data=st.data())
def test_closest_mean_takes_the_beta_values_nearest_the_median(
    seed: int, n: int, columns: int, data: st.DataObject
) -> None:
    beta = data.draw(st.integers(1, n))
    block = random_block(seed, n, columns, data.draw(st.booleans()))
    np.testing.assert_array_equal(orderstats.closest_mean(block, beta), closest_mean_reference(block, beta))


def test_closest_mean_ties_keep_the_lower_value() -> None:
    block = np.array([[0.0], [1.0], [2.0], [3.0]])  # median 1.5
    np.testing.assert_array_equal(orderstats.closest_mean(block, 2), [1.5])
    np.testing.assert_array_equal(orderstats.closest_mean(block, 3), [1.0])  # 0 and 3 tie: 0 is kept


# ---- whole strategies over blocks of any size -------------------------------------------

SHAPES = {"a": (3, 5), "b": (7,), "c": (2, 2, 2)}


def models(seed: int, n: int, ties: bool) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    if ties:
        return [
            {k: rng.integers(-2, 3, size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)
        ]
    return [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)]


def stacked(results: Sequence[Mapping[str, np.ndarray]], name: str) -> np.ndarray:
    return np.stack([np.asarray(r[name], dtype=np.float64) for r in results])


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 12),
    chunk=st.integers(1, 40),
    block_elements=st.integers(1, 200),
    beta=st.floats(0.0, 0.49),
    ties=st.booleans(),
)
def test_blocked_strategies_equal_numpy_on_the_stacked_results(
    seed: int, n: int, chunk: int, block_elements: int, beta: float, ties: bool
) -> None:
    results = models(seed, n, ties)
    sent = models(seed + 1, 1, False)[0]
    cut = int(beta * n)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunks, "BLOCK_ELEMENTS", block_elements)
        patch.setattr(chunks, "MIN_COLUMNS", 1)
        median = run_round(FedMedian(chunk_elements=chunk), sent, results)
        trimmed = run_round(FedTrimmedAvg(beta, chunk_elements=chunk), sent, results)
    for name in SHAPES:
        stack = stacked(results, name)
        assert median[name].dtype == np.float32
        np.testing.assert_array_equal(median[name], np.median(stack, axis=0).astype(np.float32))
        kept = np.sort(stack, axis=0)[cut : n - cut]
        expected = stack.mean(axis=0) if cut == 0 else sequential_mean(kept)
        np.testing.assert_array_equal(trimmed[name], expected.astype(np.float32))


# ---- Krum's distances from the Gram matrix ----------------------------------------------


def naive_distances(results: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    flat = np.stack(
        [np.concatenate([np.asarray(r[k], np.float64).reshape(-1) for k in SHAPES]) for r in results]
    )
    return np.asarray(((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2))


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 12),
    chunk=st.integers(1, 40),
    offset=st.sampled_from([0.0, 1.0, 1e3]),
    duplicates=st.integers(0, 3),
    use_center=st.booleans(),
)
def test_gram_distances_equal_the_pairwise_differences(
    seed: int, n: int, chunk: int, offset: float, duplicates: int, use_center: bool
) -> None:
    rng = np.random.default_rng(seed)
    # Results close to each other and far from the origin: the case where the Gram identity cancels.
    base = {k: offset + rng.normal(size=s) for k, s in SHAPES.items()}
    results = [{k: v + 1e-3 * rng.normal(size=v.shape) for k, v in base.items()} for _ in range(n)]
    results += [results[i % n] for i in range(duplicates)]  # exact ties
    center = base if use_center else None
    got = pairwise_sq_distances(results, layout_of(base), chunk, center)
    naive = naive_distances(results)
    np.testing.assert_array_equal(got, got.T)
    assert np.all(np.diag(got) == 0) and np.all(got >= 0)
    for copy in range(n, n + duplicates):
        # A duplicate is at distance 0 from its original and as far as it from everything else.
        original = copy % n
        assert got[copy, original] == 0
        np.testing.assert_array_equal(got[copy], got[original])
    scale = 1e-12 * max(1.0, float(naive.max())) if use_center else 1e-9 * (1 + offset) ** 2
    np.testing.assert_allclose(got, naive, rtol=1e-9, atol=scale)
    for f in range(0, max(1, len(results) - 2)):
        expected = select_multikrum(naive, f, 1)
        scores = np.sort(krum_scores(naive, f))
        # The same pick unless two scores are within rounding of each other (exact ties are kept exact).
        if len(scores) == 1 or scores[1] - scores[0] > 1e-9 * scores[1] or scores[1] == scores[0]:
            assert select_multikrum(got, f, 1) == expected


def test_krum_over_identical_results_has_zero_distances_and_picks_the_first() -> None:
    rng = np.random.default_rng(1)
    update = {k: 100.0 + rng.normal(size=s) for k, s in SHAPES.items()}
    strategy = Krum(0, chunk_elements=4)
    out = run_round(strategy, {k: np.zeros(s) for k, s in SHAPES.items()}, [update] * 6)
    assert strategy.last_selected == [0]
    for name in SHAPES:
        np.testing.assert_array_equal(out[name], update[name])


# ---- memory -------------------------------------------------------------------------------


def test_block_columns_keep_a_block_within_its_budget() -> None:
    for rows in (1, 7, 32, 128, 1000, chunks.BLOCK_ELEMENTS):
        columns = block_columns(rows)
        assert chunks.MIN_COLUMNS <= columns <= chunks.CHUNK_ELEMENTS
        # Flat in N up to BLOCK_ELEMENTS / MIN_COLUMNS results, then N x MIN_COLUMNS.
        assert rows * columns <= max(chunks.BLOCK_ELEMENTS, rows * chunks.MIN_COLUMNS)
    assert block_columns(32) * 32 == chunks.BLOCK_ELEMENTS
    assert block_columns(4, chunk_elements=3) == 3


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "multikrum", "bulyan"])
def test_memory_stays_flat_in_the_number_of_results(name: str) -> None:
    size, block_elements = 1 << 15, 1 << 13
    rng = np.random.default_rng(3)
    sent = {"w": rng.normal(size=size).astype(np.float32)}
    peaks = []
    for n in (8, 64):
        results = [{"w": rng.normal(size=size).astype(np.float32)} for _ in range(n)]
        strategy = {
            "fedmedian": FedMedian(),
            "fedtrimmedavg": FedTrimmedAvg(0.2),
            "multikrum": MultiKrum(1, 4),
            "bulyan": Bulyan(1),
        }[name]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(chunks, "BLOCK_ELEMENTS", block_elements)
            patch.setattr(chunks, "MIN_COLUMNS", 1)
            strategy.begin_round(1, sent)
            tracemalloc.start()
            try:
                strategy.aggregate_all(results, [1] * n)
                strategy.finish()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        peaks.append(peak)
    # The float32 output and a few blocks of float64, whatever N.
    bound = size * 4 + 8 * block_elements * 8
    assert max(peaks) < bound, peaks
