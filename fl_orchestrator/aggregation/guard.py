"""Nothing non-finite reaches the model: a bound on one result's magnitude, and a last check.

The bound: the weighted sum of a round can only overflow float64 if some
result has |x|·num_examples·N ≥ the largest float64, with N the number of
datasites in the job. A result over that is refused at the intake
(``overflow``), so the FedAvg family can never overflow.

The last check: a strategy that squares or divides (FedAdam's moments, a
division by a tiny total) can still produce inf or NaN from finite inputs.
``finish_finite`` refuses such an aggregate: the strategy's state is put back
as it was before the round, and the round is skipped with the model
unchanged. The job goes on.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np

from fl_orchestrator.aggregation.base import RoundSkipped, Strategy, Weights

FLOAT64_MAX = float(np.finfo(np.float64).max)


def magnitude_limit(num_examples: int, datasites: int) -> float:
    """The largest |x| a result with this weight may hold so that no round's sum overflows."""
    return FLOAT64_MAX / (max(num_examples, 1) * max(datasites, 1))


def largest_magnitude(arrays: Mapping[str, np.ndarray], *, block: int = 1 << 16) -> float:
    """max |x| over the float64 arrays (narrower floats cannot overflow a float64 sum)."""
    largest = 0.0
    for array in arrays.values():
        if array.dtype != np.float64 or array.size == 0:
            continue
        flat = array.reshape(-1)
        for start in range(0, flat.size, block):
            part = flat[start : start + block]
            largest = max(largest, abs(float(part.max())), abs(float(part.min())))
    return largest


def non_finite_arrays(model: Weights) -> list[str]:
    """Names of the float arrays that hold NaN or inf."""
    return [name for name, array in model.items() if array.dtype.kind == "f" and not np.isfinite(array).all()]


def finish_finite(strategy: Strategy) -> Weights:
    """``strategy.finish()``, refused (RoundSkipped, state restored) if the model or state is not finite.

    The state counts too: FedAdam squares the update into its second moment,
    which can reach inf while the model still looks finite, and would then
    freeze those coordinates for every later round.
    """
    before = copy.deepcopy(strategy.state_dict())
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        model = strategy.finish()
    bad = non_finite_arrays(model) + [f"state {name}" for name in _non_finite_state(strategy.state_dict())]
    if bad:
        strategy.load_state_dict(before)
        raise RoundSkipped(f"the aggregate is not finite in {', '.join(bad[:5])}: not published")
    return model


def _non_finite_state(state: object, path: str = "") -> list[str]:
    """Paths of float arrays (or floats) in a strategy state that hold NaN or inf."""
    if isinstance(state, np.ndarray):
        return [path or "."] if state.dtype.kind == "f" and not np.isfinite(state).all() else []
    if isinstance(state, float):
        return [] if np.isfinite(state) else [path or "."]
    if isinstance(state, Mapping):
        return [bad for key, value in state.items() for bad in _non_finite_state(value, f"{path}/{key}")]
    if isinstance(state, (list, tuple)):
        return [bad for i, value in enumerate(state) for bad in _non_finite_state(value, f"{path}[{i}]")]
    return []
