"""Deterministic train functions for end-to-end tests: results are known in advance."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

ENV_INDEX = "SCRIPTED_INDEX"
ENV_DELAY = "SCRIPTED_DELAY_SECONDS"
ENV_POISON_FROM_ROUND = "SCRIPTED_POISON_FROM_ROUND"
POISON = 1000.0


def scripted_update(arrays: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    """What datasite `index` returns for a given global model."""
    return {k: (v * np.float32(0.5) + np.float32(index + 1)).astype(v.dtype) for k, v in arrays.items()}


def num_examples_of(index: int) -> int:
    """How many examples datasite `index` claims."""
    return 10 * (index + 1)


def train(
    arrays: dict[str, np.ndarray], config: dict[str, Any]
) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
    """Train function run by datasite processes."""
    index = int(os.environ[ENV_INDEX])
    time.sleep(float(os.environ.get(ENV_DELAY, "0")))
    return (
        scripted_update(arrays, index),
        num_examples_of(index),
        {"loss": float(index), "round": float(config["server-round"])},
    )


def poisoning_train(
    arrays: dict[str, np.ndarray], config: dict[str, Any]
) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
    """Honest like ``train`` until a round, then an update hundreds of times the others' size."""
    update, count, metrics = train(arrays, config)
    if int(config["server-round"]) >= int(os.environ[ENV_POISON_FROM_ROUND]):
        update = {k: (v + np.float32(POISON)).astype(v.dtype) for k, v in arrays.items()}
    return update, count, metrics


def expected_fedavg(model: dict[str, np.ndarray], indices: list[int]) -> dict[str, np.ndarray]:
    """The hand-computed weighted average the daemon must produce for one round."""
    total = sum(num_examples_of(i) for i in indices)
    out = {}
    for name, value in model.items():
        acc = np.zeros(value.shape, dtype=np.float64)
        for i in indices:
            acc += scripted_update(model, i)[name].astype(np.float64) * num_examples_of(i)
        out[name] = (acc / total).astype(value.dtype)
    return out
