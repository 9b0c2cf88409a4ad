"""Distance-based Byzantine-robust aggregation: Krum, Multi-Krum (Blanchard et al. 2017), Bulyan.

Squared L2 distances between whole flattened models come from their Gram
matrix, accumulated block by block over every array on BLAS, so no update is
ever held whole; the selected results are then averaged (Multi-Krum) or
reduced coordinate-wise (Bulyan) in a second blocked pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fl_orchestrator.aggregation.base import RoundSkipped, Weights
from fl_orchestrator.aggregation.chunks import (
    CHUNK_ELEMENTS,
    Layout,
    block_buffer,
    block_columns,
    empty_model,
    flat,
    ranges,
    read_into,
    shaped,
    stack_block,
    to_dtype,
)
from fl_orchestrator.aggregation.orderstats import closest_mean
from fl_orchestrator.aggregation.robust import WholeSetStrategy

# Results closer than this, relative to the sum of their two (moved) squared norms, are
# checked for being identical: the Gram identity's rounding is about 1e-13 of that sum
# (at most k·eps ≈ 2e-12 for a block of k = 16,384 columns).
CLOSE = 1e-9


def pairwise_sq_distances(
    updates: Sequence[Mapping[str, np.ndarray]],
    layout: Layout,
    chunk_elements: int = CHUNK_ELEMENTS,
    center: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """D[i, j] = ||x_i - x_j||² over all arrays concatenated, in float64; exactly symmetric, zero diagonal.

    D[i, j] = G[i, i] + G[j, j] - 2 G[i, j] from the Gram matrix G, which each
    (N, columns) block adds to with one BLAS product (numpy runs ``a @ a.T`` as a
    syrk). The identity cancels when updates are close compared with their size,
    so each block is first moved by a reference, which leaves the distances
    unchanged: ``center`` (the strategies pass the model the round sent, so G
    holds the updates' changes to it and no result can make the others'
    distances less precise), else the block's first row. Identical results get
    identical distances (``_equalize_duplicates``).
    """
    n = len(updates)
    gram = np.zeros((n, n), dtype=np.float64)
    columns = block_columns(n, chunk_elements)
    buffer = block_buffer(n, columns)
    reference = np.empty(columns, dtype=np.float64)
    for name, spec in layout.items():
        for start, stop in ranges(spec.size, columns):
            block = buffer[: n * (stop - start)].reshape(n, stop - start)
            shift = reference[: stop - start]
            if center is None:
                read_into(updates[0], name, start, stop, shift)
            else:
                shift[...] = flat(center[name])[start:stop]
            for row, update in enumerate(updates):
                # Each row moved while it is still in cache, rather than the block after.
                read_into(update, name, start, stop, block[row])
                block[row] -= shift
            gram += block @ block.T
    norms = np.diag(gram).copy()
    # The upper triangle, mirrored: D[i, j] and D[j, i] are the same number, so a
    # mutual nearest pair ties exactly (select_multikrum relies on it).
    distances = np.triu(norms[:, None] + norms[None, :] - 2.0 * gram, 1)
    np.maximum(distances, 0.0, out=distances)
    distances += distances.T
    close = np.triu(distances <= CLOSE * (norms[:, None] + norms[None, :]), 1)
    if close.any():
        _equalize_duplicates(updates, layout, columns, close, distances)
    return distances


def _equalize_duplicates(
    updates: Sequence[Mapping[str, np.ndarray]],
    layout: Layout,
    columns: int,
    close: np.ndarray,
    distances: np.ndarray,
) -> None:
    """Give identical results distance 0 and the same distances to the others, in place.

    Identical results are common (datasites that send the same model back), and
    the Gram identity rounds their distances to a third result differently
    (BLAS kernels depend on the row's position), which would break their tie by
    rounding instead of by position. Groups of close results are read again and
    split block by block into groups of equal values; a result still equal to
    an earlier one at the end takes that one's distances. A result that differs
    leaves its group at the first block that shows it, so near-duplicates cost
    little; a group of g identical results costs g - 1 comparisons per block.
    """
    parent = list(range(len(updates)))

    def root(index: int) -> int:
        while parent[index] != index:
            index = parent[index]
        return index

    for i, j in zip(*np.nonzero(close), strict=True):
        parent[max(root(int(i)), root(int(j)))] = min(root(int(i)), root(int(j)))
    members: dict[int, list[int]] = {}
    for index in range(len(updates)):
        members.setdefault(root(index), []).append(index)
    groups = [group for group in members.values() if len(group) > 1]
    buffer = block_buffer(len(updates), columns)
    for name, spec in layout.items():
        for start, stop in ranges(spec.size, columns):
            if not groups:
                return
            rows = sorted(index for group in groups for index in group)
            block = stack_block(updates, name, start, stop, rows, out=buffer)
            values = dict(zip(rows, block, strict=True))
            split: list[list[int]] = []
            for group in groups:
                equal: list[list[int]] = []
                for index in group:
                    same = next((e for e in equal if np.array_equal(values[e[0]], values[index])), None)
                    if same is None:
                        equal.append([index])
                    else:
                        same.append(index)
                split.extend(e for e in equal if len(e) > 1)
            groups = split
    for group in groups:
        origin = group[0]  # the earliest: groups keep ascending order
        for index in group[1:]:
            distances[index, :] = distances[origin, :]
            distances[:, index] = distances[:, origin]


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
        distances = pairwise_sq_distances(updates, layout, self.chunk_elements, self._sent)
        selected = select_multikrum(distances, self.num_malicious_nodes, self.num_nodes_to_select)
        self.last_selected = selected
        weights = np.array([num_examples[i] for i in selected], dtype=np.float64)
        total = weights.sum()
        if total <= 0:
            raise RoundSkipped("the results Krum selected all report num_examples = 0")
        # Normalised factors as Flower uses: a single selected result comes back bit for bit.
        factors = weights / total
        out = empty_model(layout)
        for name, start, stop, block in self._blocks(updates, layout, selected):
            out[name][start:stop] = to_dtype(factors @ block, layout[name].dtype)
        return shaped(out, layout)


class Krum(MultiKrum):
    """Krum: the single result with the lowest score (Multi-Krum with m = 1)."""

    name = "krum"

    def __init__(self, num_malicious_nodes: int = 0, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        super().__init__(num_malicious_nodes, 1, chunk_elements)


class Bulyan(WholeSetStrategy):
    """Bulyan (El Mhamdi et al. 2018) as Flower 1.42 runs it.

    θ = n - 2f results are selected by Multi-Krum; then, per coordinate, the
    mean of the β = θ - 2f selected values closest to their median (of two
    equally close values, the lower is kept; Flower's argpartition keeps either).
    Needs n >= 4f + 3 results, else ``finish`` raises RoundSkipped.
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
        distances = pairwise_sq_distances(updates, layout, self.chunk_elements, self._sent)
        selected = select_multikrum(distances, f, theta)
        self.last_selected = selected
        return self._reduce_chunks(
            updates, layout, lambda block, scratch: closest_mean(block, beta, scratch), selected
        )
