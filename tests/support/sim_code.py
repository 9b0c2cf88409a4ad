"""Code for simulated datasites in tests: a train function that uses its context, and a partition."""

from __future__ import annotations

from typing import Any

import numpy as np


def partition(partition_id: int, num_partitions: int) -> dict[str, Any]:
    """Each datasite's share: here only a step size and a weight, as node_config settings."""
    return {"step": float(partition_id + 1), "examples": 10 * (partition_id + 1)}


def train(arrays: dict[str, np.ndarray], config: dict[str, Any], context: Any) -> Any:
    """Every array plus this datasite's step, weighted by its examples (from its node_config)."""
    node = context.node_config
    stepped = {k: (v + np.asarray(node["step"], v.dtype)) for k, v in arrays.items()}
    return stepped, int(node["examples"]), {"step": float(node["step"])}
