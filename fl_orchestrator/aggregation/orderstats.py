"""Order statistics per coordinate of an (N, columns) block: median, trimmed mean, Bulyan's closest mean.

The block is copied once into a (columns, N) buffer and each row of that is
sorted with ``ndarray.sort``: for short rows numpy runs a SIMD sorting network,
about 60 ns per coordinate at N = 32, where ``np.median`` or ``np.partition``
along axis 0 of the block (a strided copy and one introselect per coordinate)
take 400 ns. Every statistic below is then read off the sorted rows.

Float semantics are those of numpy on the block: a median of an even count is
the mean of the two middle values, (a + b) / 2 in float64, as ``np.median``;
a mean over kept values adds them one after the other in ascending order and
divides by their count, as ``np.mean`` over axis 0 of the sorted kept rows.
Inputs are finite (the intake refuses NaN), so the sort order is total.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from fl_orchestrator.aggregation.chunks import ranges

# Rows of sorted values reduced at a time, in values: strided reads within a tile stay
# in the core's cache (512 KiB of float64 values).
TILE_VALUES = 1 << 16
# Bulyan's closest mean loops over β positions per tile: with hundreds of results a tile
# of TILE_VALUES would be a few hundred rows, and the loop mostly numpy's per-call cost.
CLOSEST_TILE_ROWS = 1 << 10


def sort_columns(block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The block's columns as the rows of a (columns, N) float64 array, each sorted ascending.

    ``out``, when given, is flat scratch space of at least block.size float64 values.
    """
    n, columns = block.shape
    storage = np.empty(n * columns, dtype=np.float64) if out is None else out[: n * columns]
    cols = storage.reshape(columns, n)
    np.copyto(cols, block.T)
    cols.sort(axis=1)
    return cols


def median_of_sorted(cols: np.ndarray) -> np.ndarray:
    """Per row of sorted values: the middle one, or the mean of the two middle ones."""
    n = cols.shape[1]
    half = n // 2
    if n % 2:
        return cols[:, half].copy()
    total: np.ndarray = cols[:, half - 1] + cols[:, half]
    total /= 2
    return total


def _tiles(rows: int, width: int, least_rows: int = 1) -> Iterator[tuple[int, int]]:
    """Row ranges of a (rows, width) array: TILE_VALUES values, or least_rows rows if more."""
    return ranges(rows, max(least_rows, TILE_VALUES // max(width, 1)))


def mean_of_sorted(cols: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Per row of sorted values: the mean of positions [start, stop), added in ascending order."""
    total = np.empty(cols.shape[0], dtype=np.float64)
    for first, last in _tiles(cols.shape[0], stop - start):
        # One contiguous row per position, a tile at a time: adding strided columns of
        # the whole block would read every cache line of it once per position.
        kept = np.ascontiguousarray(cols[first:last, start:stop].T)
        part = total[first:last]
        part[...] = kept[0]
        for values in kept[1:]:
            part += values
    total /= stop - start
    return total


def trimmed_mean(block: np.ndarray, beta: float, scratch: np.ndarray | None = None) -> np.ndarray:
    """Mean over axis 0 after dropping int(beta·n) values at each end, per column.

    With nothing to drop it is ``block.mean(axis=0)``, the rows added in their order.
    """
    n = block.shape[0]
    cut = int(beta * n)
    if cut == 0:
        return np.asarray(block.mean(axis=0))
    return mean_of_sorted(sort_columns(block, scratch), cut, n - cut)


def median(block: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """``np.median(block, axis=0)`` for finite values, bit for bit but for the sign of a zero.

    Where +0.0 and -0.0 meet in the middle of a column, either may come out, as
    from ``np.median`` (its partition keeps no order between equal values).
    """
    if block.shape[0] <= 2:
        # One value, or the mean of two: no order needed.
        return np.asarray(np.median(block, axis=0))
    return median_of_sorted(sort_columns(block, scratch))


def closest_mean_of_sorted(cols: np.ndarray, beta: int) -> np.ndarray:
    """Per row of sorted values: the mean of the beta values closest to the row's median.

    Those values are consecutive in sorted order: starting from the whole row,
    the end farther from the median is dropped until beta are left (|x - m| is
    convex in x, so the farthest value is always at an end). When both ends
    are equally far, the higher value is dropped.
    """
    rows, n = cols.shape
    if not 1 <= beta <= n:
        raise ValueError(f"beta must be in [1, {n}], got {beta}")
    middle = median_of_sorted(cols)
    total = np.empty(rows, dtype=np.float64)
    for first, last in _tiles(rows, n, CLOSEST_TILE_ROWS):
        # Gathers within a tile that stays in cache; flat indices into it.
        tile = cols[first:last].reshape(-1)
        centre = middle[first:last]
        low = np.arange(last - first, dtype=np.intp) * n
        high = low + (n - 1)
        for _ in range(n - beta):
            drop_low = centre - tile[low] > tile[high] - centre
            low += drop_low
            high -= ~drop_low
        part = total[first:last]
        part[...] = tile[low]
        for offset in range(1, beta):
            part += tile[low + offset]
    total /= beta
    return total


def closest_mean(block: np.ndarray, beta: int, scratch: np.ndarray | None = None) -> np.ndarray:
    """Per column: the mean of the beta values closest to the column's median."""
    return closest_mean_of_sorted(sort_columns(block, scratch), beta)
