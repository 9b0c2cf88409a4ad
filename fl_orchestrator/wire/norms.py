"""The size of a result's update: the L2 norm of (result - global model), and clipping.

Both work block by block in float64 through one small scratch buffer, so a
model of any size costs no full-size temporary: the norm allocates nothing
that scales with the model, and clipping allocates only its output arrays.
The caller has already checked that names, dtypes and shapes match and that
every float is finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

# Elements per block: the float64 scratch (512 KiB) and the slices it is
# computed from stay in a typical L2 cache.
BLOCK_ELEMENTS = 1 << 16


def update_norm(
    result: Mapping[str, np.ndarray], model: Mapping[str, np.ndarray], *, block: int = BLOCK_ELEMENTS
) -> float:
    """sqrt(sum over all arrays of (result - model)**2), accumulated in float64.

    Integer and bool arrays count too: they are cast to float64 before the
    subtraction, so unsigned values never wrap. Returns inf if the sum
    overflows float64 (possible only for float64 values near 1e154).
    """
    scratch = np.empty(block, dtype=np.float64)
    total = 0.0
    # Overflow is an expected answer here (huge float64 values), not an error:
    # it makes the total inf, which the caller refuses.
    with np.errstate(over="ignore", invalid="ignore"):
        for name, reference in model.items():
            new = result[name].reshape(-1)
            old = reference.reshape(-1)
            for start in range(0, new.size, block):
                stop = min(start + block, new.size)
                diff = scratch[: stop - start]
                # Casting each side first: numpy has no bool subtract, and an
                # unsigned subtract would wrap before the cast.
                np.copyto(diff, new[start:stop], casting="unsafe")
                diff -= old[start:stop]
                total += float(np.dot(diff, diff))
    return math.sqrt(total) if math.isfinite(total) else math.inf


def clip_update(
    result: Mapping[str, np.ndarray],
    model: Mapping[str, np.ndarray],
    scale: float,
    *,
    block: int = BLOCK_ELEMENTS,
) -> dict[str, np.ndarray]:
    """New arrays model + scale * (result - model), each in the model's dtype.

    Computed in float64; integer arrays are rounded to the nearest value and
    bools become True where the scaled value rounds to 1. With 0 <= scale <= 1
    every value lies between the model's and the result's, so no cast overflows.
    """
    scratch = np.empty(block, dtype=np.float64)
    clipped: dict[str, np.ndarray] = {}
    for name, reference in model.items():
        new = result[name].reshape(-1)
        old = reference.reshape(-1)
        out = np.empty(reference.shape, dtype=reference.dtype)
        flat_out = out.reshape(-1)
        rounds = reference.dtype.kind in "iub"
        for start in range(0, new.size, block):
            stop = min(start + block, new.size)
            part = scratch[: stop - start]
            np.copyto(part, new[start:stop], casting="unsafe")
            part -= old[start:stop]
            part *= scale
            part += old[start:stop]
            if rounds:
                np.rint(part, out=part)
            np.copyto(flat_out[start:stop], part, casting="unsafe")
        clipped[name] = out
    return clipped
