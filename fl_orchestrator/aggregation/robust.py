"""Coordinate-wise robust aggregation: FedMedian and FedTrimmedAvg (Yin et al. 2018).

These need every result at once, so they are whole-set strategies
(``streaming = False``). They never stack N whole models: each array is read
in blocks of at most ``chunk_elements`` columns across the N updates, and at
most ``BLOCK_ELEMENTS`` values in all (see chunks.py), so updates may be
``np.memmap`` views or ``FileUpdate`` readers over the result files. Each block
is sorted per coordinate (orderstats.py), which is what makes the median and
the trimmed mean cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from fl_orchestrator.aggregation import orderstats
from fl_orchestrator.aggregation.base import RoundSkipped, StrategyBase, Weights
from fl_orchestrator.aggregation.chunks import (
    CHUNK_ELEMENTS,
    Layout,
    block_buffer,
    block_columns,
    check_updates,
    empty_model,
    layout_of,
    ranges,
    shaped,
    stack_block,
    to_dtype,
)

# A per-coordinate reduction of an (N, columns) float64 block, given scratch space
# of the block's size; returns one float64 value per column.
BlockReduce = Callable[[np.ndarray, np.ndarray], np.ndarray]


class WholeSetStrategy(StrategyBase):
    """Collects the round's updates, then aggregates them all in ``finish``.

    The shell's memory-frugal path is ``aggregate_all`` with updates that are
    memmap views over the result files. ``fold`` also works, but it keeps a
    reference to every folded update until ``finish``, so in-memory updates
    then cost N models of memory.
    """

    name = "whole-set"
    streaming = False

    def __init__(self, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        if chunk_elements < 1:
            raise ValueError("chunk_elements must be at least 1")
        self.chunk_elements = chunk_elements
        self._layout: Layout | None = None
        self._sent: Mapping[str, np.ndarray] = {}
        self._updates: list[Mapping[str, np.ndarray]] = []
        self._num_examples: list[int] = []

    def begin_round(self, rnd: int, global_model: Mapping[str, np.ndarray]) -> None:
        """Forget the previous round's updates; take the output layout from the model sent."""
        self._layout = layout_of(global_model)
        self._sent = global_model
        self._updates, self._num_examples = [], []

    def fold(self, update: Mapping[str, np.ndarray], num_examples: int) -> None:
        """Keep a reference to one result until ``finish``."""
        self.aggregate_all([update], [num_examples])

    def aggregate_all(self, updates: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int]) -> None:
        """Take results (references only; nothing is read until ``finish``)."""
        if self._layout is None:
            raise RuntimeError("aggregate_all before begin_round")
        if len(updates) != len(num_examples):
            raise ValueError("updates and num_examples differ in length")
        check_updates(updates, self._layout)
        self._updates.extend(updates)
        self._num_examples.extend(int(n) for n in num_examples)

    def finish(self) -> Weights:
        """Aggregate every collected result; raise RoundSkipped when there are too few."""
        if self._layout is None:
            raise RuntimeError("finish before begin_round")
        if not self._updates:
            raise RoundSkipped("no results were collected this round")
        result = self._aggregate(self._updates, self._num_examples, self._layout)
        self._updates, self._num_examples = [], []
        return result

    def _aggregate(
        self, updates: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int], layout: Layout
    ) -> Weights:
        raise NotImplementedError

    def _blocks(
        self, updates: Sequence[Mapping[str, np.ndarray]], layout: Layout, rows: Sequence[int] | None = None
    ) -> Iterator[tuple[str, int, int, np.ndarray]]:
        """(array name, start, stop, block) over every array; each block reuses one buffer.

        A block is valid until the next one is yielded. ``rows`` picks updates (in that order).
        """
        count = len(updates) if rows is None else len(rows)
        columns = block_columns(count, self.chunk_elements)
        buffer = block_buffer(count, columns)
        for name, spec in layout.items():
            for start, stop in ranges(spec.size, columns):
                yield name, start, stop, stack_block(updates, name, start, stop, rows, out=buffer)

    def _reduce_chunks(
        self,
        updates: Sequence[Mapping[str, np.ndarray]],
        layout: Layout,
        reduce: BlockReduce,
        rows: Sequence[int] | None = None,
    ) -> Weights:
        """Apply ``reduce`` to every (N, columns) block and assemble the model."""
        out = empty_model(layout)
        count = len(updates) if rows is None else len(rows)
        scratch = block_buffer(count, block_columns(count, self.chunk_elements))
        for name, start, stop, block in self._blocks(updates, layout, rows):
            out[name][start:stop] = to_dtype(reduce(block, scratch), layout[name].dtype)
        return shaped(out, layout)


class FedMedian(WholeSetStrategy):
    """Coordinate-wise median of the results, unweighted (Yin et al. 2018)."""

    name = "fedmedian"

    def _aggregate(
        self, updates: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int], layout: Layout
    ) -> Weights:
        return self._reduce_chunks(updates, layout, orderstats.median)


class FedTrimmedAvg(WholeSetStrategy):
    """Coordinate-wise trimmed mean, unweighted: cut int(beta·n) from each end."""

    name = "fedtrimmedavg"

    def __init__(self, beta: float = 0.2, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        super().__init__(chunk_elements)
        if not 0.0 <= beta < 0.5:
            raise ValueError("beta must be in [0, 0.5)")
        self.beta = float(beta)

    def _aggregate(
        self, updates: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int], layout: Layout
    ) -> Weights:
        return self._reduce_chunks(
            updates, layout, lambda block, scratch: orderstats.trimmed_mean(block, self.beta, scratch)
        )
