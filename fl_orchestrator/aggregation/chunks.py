"""Reading many updates slice by slice, so no strategy stacks N whole models.

Whole-set strategies (median, trimmed mean, Krum, Bulyan) need every result at
once for each coordinate. They read the same element range of one array from
all N updates into an ``(N, chunk)`` float64 block, reduce it, and write the
chunk of the output: peak memory is ``N * chunk`` plus the output model, and
updates backed by ``np.memmap`` are paged in a slice at a time.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fl_orchestrator.aggregation.base import Weights

# 64 Ki elements: with N = 100 updates a float64 block is 50 MiB, and numpy's
# per-call overhead is amortised over enough work.
CHUNK_ELEMENTS = 1 << 16


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


def stack_block(
    updates: Sequence[Mapping[str, np.ndarray]],
    name: str,
    start: int,
    stop: int,
    rows: Sequence[int] | None = None,
) -> np.ndarray:
    """An (N, stop - start) float64 block: the same slice of one array from each update."""
    indices = range(len(updates)) if rows is None else rows
    block = np.empty((len(indices), stop - start), dtype=np.float64)
    for row, index in enumerate(indices):
        block[row] = read_block(updates[index], name, start, stop)
    return block


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
