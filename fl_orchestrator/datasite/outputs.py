"""How the data owner's train and evaluate functions are called, and what they return.

A function may take a third argument, ``context``: the datasite's identity,
the data owner's own settings (``--node-config``), the round and the task id.
What it returns is checked here: a mismatch is reported by the data owner's
runner, with a message they can act on, rather than as a quarantined file on
the server.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TaskContext:
    """What a train or evaluate function may learn of where and when it runs."""

    email: str
    node_id: int
    node_config: dict[str, Any] = field(default_factory=dict)
    round: int = 0
    task_id: str = ""
    # When the aggregator stops waiting for this answer (seconds since the epoch), if it said.
    deadline: float | None = None


def call_with_context(
    function: Callable[..., Any], arrays: dict[str, np.ndarray], config: dict[str, Any], context: TaskContext
) -> Any:
    """``function(arrays, config)``, or with ``context=`` when it takes that argument."""
    if _takes_context(function):
        return function(arrays, config, context=context)
    return function(arrays, config)


def _takes_context(function: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return "context" in parameters


class TrainOutputError(TypeError):
    """The train function returned something other than (arrays, num_examples, metrics)."""


def normalise_train_output(
    output: Any, reference: Mapping[str, np.ndarray] | None = None
) -> tuple[dict[str, np.ndarray], int, dict[str, int | float]]:
    """Check the train function's return value against the model it was given.

    A mismatch is reported here, by the data owner's runner, with a message
    they can act on, rather than as a quarantined file on the server.
    """
    if not (isinstance(output, tuple) and len(output) == 3):
        raise TrainOutputError("train must return (arrays, num_examples, metrics)")
    arrays, num_examples, metrics = output
    if not isinstance(arrays, Mapping) or not all(isinstance(v, np.ndarray) for v in arrays.values()):
        raise TrainOutputError("arrays must be a dict of numpy arrays")
    if reference is not None:
        if set(arrays) != set(reference):
            missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
            raise TrainOutputError(f"arrays must have the model's names: missing {missing}, extra {extra}")
        for name, ref in reference.items():
            got = arrays[name]
            if got.dtype != ref.dtype or got.shape != ref.shape:
                raise TrainOutputError(
                    f"array {name!r} is {got.dtype}{list(got.shape)};"
                    f" the model's is {ref.dtype}{list(ref.shape)}"
                )
            if got.dtype.kind == "f" and not np.isfinite(got).all():
                raise TrainOutputError(f"array {name!r} holds NaN or Inf")
    count, clean = _count_and_metrics(num_examples, metrics)
    return dict(arrays), count, clean


def normalise_evaluate_output(output: Any) -> tuple[int, dict[str, int | float]]:
    """Check the evaluate function's return value: (num_examples, metrics)."""
    if not (isinstance(output, tuple) and len(output) == 2):
        raise TrainOutputError("evaluate must return (num_examples, metrics)")
    return _count_and_metrics(*output)


def _count_and_metrics(num_examples: Any, metrics: Any) -> tuple[int, dict[str, int | float]]:
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples <= 0:
        raise TrainOutputError("num_examples must be a positive int")
    clean: dict[str, int | float] = {}
    for key, value in dict(metrics or {}).items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
            raise TrainOutputError(f"metric {key!r} must be a number")
        number = value.item() if isinstance(value, np.generic) else value
        if isinstance(number, float) and not math.isfinite(number):
            raise TrainOutputError(f"metric {key!r} is not finite")
        clean[str(key)] = number
    return int(num_examples), clean
