"""The model of the test app: two float32 arrays, and where a run's initial values come from.

numpy only, so the harness (which has no flwr) can load this file by path and write the
same initial model for the daemon.
"""

from __future__ import annotations

import os

import numpy as np

ARRAY_NAMES = ("w0", "w1")
ENV_INITIAL_NPZ = "FLT_INITIAL_NPZ"


def default_arrays() -> list[np.ndarray]:
    """A fixed, asymmetric initial model: w0 (4, 3) and w1 (3,), float32."""
    w0 = (np.arange(12, dtype=np.float32).reshape(4, 3) - np.float32(5.5)) / np.float32(4.0)
    w1 = np.array([0.5, -1.25, 2.0], dtype=np.float32)
    return [w0, w1]


def initial_arrays() -> list[np.ndarray]:
    """$FLT_INITIAL_NPZ's arrays in the file's order if set, else default_arrays()."""
    path = os.environ.get(ENV_INITIAL_NPZ)
    if not path:
        return default_arrays()
    with np.load(path, allow_pickle=False) as archive:
        return [np.array(archive[name]) for name in archive.files]


def summary(arrays: list[np.ndarray], max_values: int = 4096) -> dict[str, object]:
    """What a trace line records of some arrays: every value if few, else per-array sums."""
    out: dict[str, object] = {
        "dtypes": [str(a.dtype) for a in arrays],
        "shapes": [list(a.shape) for a in arrays],
    }
    if sum(a.size for a in arrays) <= max_values:
        out["values"] = [a.astype(np.float64).ravel().tolist() for a in arrays]
    else:
        out["sums"] = [float(np.sum(a, dtype=np.float64)) for a in arrays]
    return out
