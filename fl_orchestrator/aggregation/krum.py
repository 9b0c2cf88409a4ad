"""Distance-based Byzantine-robust aggregation: Krum, Multi-Krum (Blanchard et al. 2017), Bulyan.

Squared L2 distances between whole flattened models are accumulated chunk by
chunk over every array, so no update is ever held whole; the selected results
are then averaged (Multi-Krum) or reduced coordinate-wise (Bulyan) in a second
chunked pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fl_orchestrator.aggregation.base import RoundSkipped, Weights
from fl_orchestrator.aggregation.chunks import (
    CHUNK_ELEMENTS,
    Layout,
    empty_model,
    ranges,
    shaped,
    stack_block,
    to_dtype,
)
from fl_orchestrator.aggregation.robust import WholeSetStrategy


def pairwise_sq_distances(
    updates: Sequence[Mapping[str, np.ndarray]], layout: Layout, chunk_elements: int = CHUNK_ELEMENTS
) -> np.ndarray:
    """D[i, j] = ||x_i - x_j||² over all arrays concatenated, in float64."""
    n = len(updates)
    distances = np.zeros((n, n), dtype=np.float64)
    for name, spec in layout.items():
        for start, stop in ranges(spec.size, chunk_elements):
            block = stack_block(updates, name, start, stop)
            # Differences rather than the Gram identity: no cancellation when updates are close.
            for i in range(n - 1):
                diff = block[i + 1 :] - block[i]
                distances[i, i + 1 :] += np.einsum("ij,ij->i", diff, diff)
    return distances + distances.T


def krum_scores(distances: np.ndarray, num_malicious_nodes: int) -> np.ndarray:
    """Score of each result: the sum of its k = max(1, n - f - 2) smallest distances to the others."""
    n = distances.shape[0]
    k = max(1, n - num_malicious_nodes - 2)
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.sort(np.delete(distances[i], i))
        scores[i] = others[:k].sum()
    return scores


def select_multikrum(distances: np.ndarray, num_malicious_nodes: int, num_to_select: int) -> list[int]:
    """Indices of the num_to_select lowest Krum scores.

    Equal scores are common, not a corner case: with k = 1 two mutually
    nearest results always tie. They are broken by the total distance to all
    results, then by position; the daemon passes results sorted by datasite,
    so the choice never depends on which datasite uploaded first (Flower
    keeps arrival order).
    """
    scores = krum_scores(distances, num_malicious_nodes)
    # Sorted before summing: the same bits whatever the order the results came in.
    totals = np.sort(distances, axis=1).sum(axis=1)
    order = np.lexsort((np.arange(len(scores)), totals, scores))
    return [int(i) for i in order[:num_to_select]]


class MultiKrum(WholeSetStrategy):
    """Keep the m results with the lowest Krum scores and take their num_examples-weighted mean.

    When m exceeds the number of results, all of them are kept.
    """

    name = "multikrum"

    def __init__(
        self, num_malicious_nodes: int = 0, num_nodes_to_select: int = 1, chunk_elements: int = CHUNK_ELEMENTS
    ) -> None:
        super().__init__(chunk_elements)
        if num_malicious_nodes < 0:
            raise ValueError("num_malicious_nodes must be >= 0")
        if num_nodes_to_select < 1:
            raise ValueError("num_nodes_to_select must be >= 1")
        self.num_malicious_nodes = int(num_malicious_nodes)
        self.num_nodes_to_select = int(num_nodes_to_select)
        self.last_selected: list[int] = []

    def _aggregate(
        self, updates: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int], layout: Layout
    ) -> Weights:
        distances = pairwise_sq_distances(updates, layout, self.chunk_elements)
        selected = select_multikrum(distances, self.num_malicious_nodes, self.num_nodes_to_select)
        self.last_selected = selected
        weights = np.array([num_examples[i] for i in selected], dtype=np.float64)
        total = weights.sum()
        if total <= 0:
            raise RoundSkipped("the results Krum selected all report num_examples = 0")
        # Normalised factors as Flower uses: a single selected result comes back bit for bit.
        factors = weights / total
        out = empty_model(layout)
        for name, spec in layout.items():
            for start, stop in ranges(spec.size, self.chunk_elements):
                block = stack_block(updates, name, start, stop, selected)
                out[name][start:stop] = to_dtype(factors @ block, spec.dtype)
        return shaped(out, layout)


class Krum(MultiKrum):
    """Krum: the single result with the lowest score (Multi-Krum with m = 1)."""

    name = "krum"

    def __init__(self, num_malicious_nodes: int = 0, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        super().__init__(num_malicious_nodes, 1, chunk_elements)


def closest_mean(block: np.ndarray, beta: int) -> np.ndarray:
    """Per column: the mean of the beta values closest to the column's median."""
    median = np.median(block, axis=0)
    nearest = np.argpartition(np.abs(block - median), beta - 1, axis=0)[:beta]
    return np.asarray(np.take_along_axis(block, nearest, axis=0).mean(axis=0))


class Bulyan(WholeSetStrategy):
    """Bulyan (El Mhamdi et al. 2018) as Flower 1.42 runs it.

    θ = n - 2f results are selected by Multi-Krum; then, per coordinate, the
    mean of the β = θ - 2f selected values closest to their median. Needs
    n >= 4f + 3 results, else ``finish`` raises RoundSkipped.
    """

    name = "bulyan"

    def __init__(self, num_malicious_nodes: int = 0, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        super().__init__(chunk_elements)
        if num_malicious_nodes < 0:
            raise ValueError("num_malicious_nodes must be >= 0")
        self.num_malicious_nodes = int(num_malicious_nodes)
        self.last_selected: list[int] = []

    def _aggregate(
        self, updates: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int], layout: Layout
    ) -> Weights:
        n, f = len(updates), self.num_malicious_nodes
        if n < 4 * f + 3:
            raise RoundSkipped(
                f"bulyan needs at least 4*num_malicious_nodes + 3 = {4 * f + 3} results "
                f"(num_malicious_nodes = {f}), but the round has {n}"
            )
        theta = n - 2 * f
        beta = theta - 2 * f
        distances = pairwise_sq_distances(updates, layout, self.chunk_elements)
        selected = select_multikrum(distances, f, theta)
        self.last_selected = selected
        out = empty_model(layout)
        for name, spec in layout.items():
            for start, stop in ranges(spec.size, self.chunk_elements):
                block = stack_block(updates, name, start, stop, selected)
                out[name][start:stop] = to_dtype(closest_mean(block, beta), spec.dtype)
        return shaped(out, layout)
