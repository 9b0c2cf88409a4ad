"""Reading many updates slice by slice, so no strategy stacks N whole models.

Whole-set strategies (median, trimmed mean, Krum, Bulyan) need every result at
once for each coordinate. They read the same element range of one array from
all N updates into an ``(N, chunk)`` float64 block, reduce it, and write the
chunk of the output: peak memory is a few blocks plus the output model, and
updates backed by ``np.memmap`` are paged in a slice at a time.

A block holds at most ``BLOCK_ELEMENTS`` values whatever N (``block_columns``),
so memory stays flat in N, and a block of a few MiB stays in cache while it is
transposed, sorted or multiplied.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fl_orchestrator.aggregation.base import Weights

# 64 Ki elements: the slice read at a time, and the most columns a whole-set block has
# (fewer when N rows of them would pass BLOCK_ELEMENTS); numpy's per-call overhead is
# amortised over enough work.
CHUNK_ELEMENTS = 1 << 16
# Values in one (N, columns) block: 4 MiB of float64. Measured with N = 32 results of
# 10M float32 on 2 vCPUs (2 MiB of L2 each): 2^18 to 2^20 within 5 % of each other for
# median, trimmed mean and Krum; 2^16 15-35 % slower (per-call cost), 2^21 slower too.
BLOCK_ELEMENTS = 1 << 19
# Fewest columns a block has (unless chunk_elements is smaller), whatever N: below this,
# each row's read is mostly per-call cost (a FileUpdate read costs a few µs before its
# first byte), and N reads per block of ever fewer columns would grow as N². Past
# N = BLOCK_ELEMENTS / MIN_COLUMNS (128) a block grows with N: N x 32 KiB.
MIN_COLUMNS = 1 << 12


class LazyUpdate(Mapping[str, np.ndarray]):
    """An update that computes its values on demand (the DP wrapper's clipped view).

    Indexing gives the whole array; chunked readers call ``read_block`` instead
    so that only a slice is ever computed.
    """

    @abstractmethod
    def read_block(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of the flattened array, as float64."""

    @abstractmethod
    def shape_of(self, name: str) -> tuple[int, ...]:
        """The array's shape, without computing it."""


@dataclass(frozen=True)
class ArrayLayout:
    """Shape and dtype of one array of the global model."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


Layout = dict[str, ArrayLayout]


def layout_of(model: Mapping[str, np.ndarray]) -> Layout:
    """The shapes and dtypes the round's output must have."""
    return {name: ArrayLayout(tuple(np.shape(a)), np.asarray(a).dtype) for name, a in model.items()}


def flat(array: np.ndarray) -> np.ndarray:
    """A 1-D view (a copy only for non-contiguous input, which files never give)."""
    return np.asarray(array).reshape(-1)


def shape_of(update: Mapping[str, np.ndarray], name: str) -> tuple[int, ...]:
    """The shape of one array of an update, without materialising a lazy one."""
    if isinstance(update, LazyUpdate):
        return update.shape_of(name)
    return tuple(np.shape(update[name]))


def read_block(update: Mapping[str, np.ndarray], name: str, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of one flattened array of an update (not yet float64)."""
    if isinstance(update, LazyUpdate):
        return update.read_block(name, start, stop)
    return flat(update[name])[start:stop]


def check_updates(updates: Sequence[Mapping[str, np.ndarray]], layout: Layout) -> None:
    """Refuse an update whose arrays do not match the global model's names and shapes."""
    for index, update in enumerate(updates):
        for name, spec in layout.items():
            if name not in update:
                raise ValueError(f"update {index} has no array {name!r}")
            shape = shape_of(update, name)
            if shape != spec.shape:
                raise ValueError(f"update {index}: array {name!r} has shape {shape}, expected {spec.shape}")


def ranges(size: int, chunk: int) -> Iterator[tuple[int, int]]:
    """[start, stop) pairs covering 0..size in steps of chunk."""
    for start in range(0, size, chunk):
        yield start, min(start + chunk, size)


def block_columns(rows: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Columns per block: ``chunk_elements``, fewer when ``rows`` of them would pass BLOCK_ELEMENTS.

    Never fewer than MIN_COLUMNS (nor than one), unless chunk_elements is.
    """
    return max(1, min(chunk_elements, max(MIN_COLUMNS, BLOCK_ELEMENTS // max(rows, 1))))


def block_buffer(rows: int, columns: int) -> np.ndarray:
    """Scratch space for ``stack_block(..., out=)``: any block of up to rows x columns."""
    return np.empty(rows * columns, dtype=np.float64)


def stack_block(
    updates: Sequence[Mapping[str, np.ndarray]],
    name: str,
    start: int,
    stop: int,
    rows: Sequence[int] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """An (N, stop - start) float64 block: the same slice of one array from each update.

    With ``out`` (from ``block_buffer``) the block is a C-contiguous view of it,
    valid until the next call with the same buffer.
    """
    indices = range(len(updates)) if rows is None else rows
    shape = (len(indices), stop - start)
    storage = block_buffer(*shape) if out is None else out[: shape[0] * shape[1]]
    block = storage.reshape(shape)
    for row, index in enumerate(indices):
        read_into(updates[index], name, start, stop, block[row])
    return block


def read_into(update: Mapping[str, np.ndarray], name: str, start: int, stop: int, out: np.ndarray) -> None:
    """Elements [start, stop) of one flattened array of an update, into a float64 row."""
    out[...] = read_block(update, name, start, stop)


def to_dtype(values: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """Cast float64 results to a model dtype, rounding for integer and bool arrays."""
    if dtype.kind in "iub":
        values = np.rint(values)
    return values.astype(dtype, copy=False)


def empty_model(layout: Layout) -> Weights:
    """Flat output arrays in the model's dtypes, filled chunk by chunk."""
    return {name: np.empty(spec.size, dtype=spec.dtype) for name, spec in layout.items()}


def shaped(model: Weights, layout: Layout) -> Weights:
    """Give flat output arrays their model shapes back."""
    return {name: model[name].reshape(spec.shape) for name, spec in layout.items()}
