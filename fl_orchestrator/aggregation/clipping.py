"""The one rule for an update's size and for clipping it, used by the intake and by every strategy.

An update is u = x - x_t, a result minus the model it was trained from; its
size is the L2 norm of u over every array of the model concatenated,
accumulated in float64. Clipping to a factor s in [0, 1] gives
x_t + s·u, computed in float64 and rounded to the nearest integer for
integer and bool arrays. The intake's norm bound (``[limits]
max_update_norm``), the whole-set strategies re-reading a clipped result and
server-side DP clipping all go through these functions, so an array is
clipped the same way wherever it is clipped.

Everything works block by block through one float64 scratch buffer: no
temporary scales with the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np

from fl_orchestrator.aggregation.chunks import LazyUpdate, flat, ranges, read_block, shape_of, to_dtype

# Elements per block: the float64 scratch (512 KiB) and the slices it is
# computed from stay in a typical L2 cache.
BLOCK_ELEMENTS = 1 << 16


def update_norm(
    update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], *, block: int = BLOCK_ELEMENTS
) -> float:
    """||update - base||₂ over every array of ``base``, in float64; inf if it overflows.

    Integer and bool arrays count too: each side is cast to float64 before the
    subtraction, so unsigned values never wrap. ``update`` may be a LazyUpdate
    read block by block.
    """
    scratch = np.empty(block, dtype=np.float64)
    total = 0.0
    # Overflow is an expected answer here (huge float64 values), not an error:
    # it makes the total inf, which callers refuse.
    with np.errstate(over="ignore", invalid="ignore"):
        for name, reference in base.items():
            old = flat(reference)
            for start, stop in ranges(old.size, block):
                diff = scratch[: stop - start]
                np.copyto(diff, read_block(update, name, start, stop), casting="unsafe")
                diff -= old[start:stop]
                total += float(np.dot(diff, diff))
    return math.sqrt(total) if math.isfinite(total) else math.inf


def clip_factor(norm: float, bound: float) -> float:
    """The factor that brings an update of ``norm`` to at most ``bound`` (1.0 if it already is)."""
    return 1.0 if norm <= bound else bound / norm


class ClippedUpdate(LazyUpdate):
    """x_t + scale·(x - x_t) as a view: each block is computed when it is read."""

    def __init__(
        self, update: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], scale: float
    ) -> None:
        self.update = update
        self.base = base
        self.scale = scale

    def read_block(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of the clipped flattened array, as float64."""
        raw = read_block(self.update, name, start, stop)
        if self.scale >= 1.0:
            return np.asarray(raw, dtype=np.float64)
        reference = flat(self.base[name])
        clipped = raw.astype(np.float64)
        clipped -= reference[start:stop]
        clipped *= self.scale
        clipped += reference[start:stop]
        if reference.dtype.kind in "iub":
            np.rint(clipped, out=clipped)
        return clipped

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The wrapped update's shape."""
        return shape_of(self.update, name)

    def __getitem__(self, name: str) -> np.ndarray:
        reference = np.asarray(self.base[name])
        out = np.empty(reference.size, dtype=np.float64)
        for start, stop in ranges(out.size, BLOCK_ELEMENTS):
            out[start:stop] = self.read_block(name, start, stop)
        return out.reshape(reference.shape)

    def __contains__(self, name: object) -> bool:
        # Mapping's default would compute the whole clipped array just to test membership.
        return name in self.base

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def clip_update(
    update: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray],
    scale: float,
    *,
    block: int = BLOCK_ELEMENTS,
) -> dict[str, np.ndarray]:
    """The clipped update as new arrays in the base model's dtypes (what the intake keeps)."""
    view = ClippedUpdate(update, base, scale)
    clipped: dict[str, np.ndarray] = {}
    for name, reference in base.items():
        out = np.empty(np.shape(reference), dtype=np.asarray(reference).dtype)
        out_flat = out.reshape(-1)
        for start, stop in ranges(out_flat.size, block):
            out_flat[start:stop] = to_dtype(view.read_block(name, start, stop), out.dtype)
        clipped[name] = out
    return clipped
