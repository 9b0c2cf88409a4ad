"""Server optimizers over the streaming FedAvg mean: FedAvgM, FedAdam, FedYogi, FedAdagrad.

Each round folds results into a float64 ``WeightedSum`` exactly as FedAvg does;
at round close the mean x̄ is turned into a step from the model sent this
round, x_t. Optimizer state (momentum, first and second moments) is kept in
float64 whatever the model dtype, and survives restarts through
``state_dict``. Formulas follow Flower 1.42 (see docs/STRATEGIES.md for where
Flower departs from Reddi et al. 2021).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fl_orchestrator.aggregation.base import StrategyState, Weights
from fl_orchestrator.aggregation.chunks import flat, to_dtype
from fl_orchestrator.aggregation.fedavg import FedAvg

Moments = dict[str, np.ndarray]


def _load_moments(state: Mapping[str, Any] | None, what: str) -> Moments | None:
    """Copy moments out of a decoded state (decoded buffers may be read-only)."""
    if state is None:
        return None
    if not isinstance(state, Mapping):
        raise ValueError(f"strategy state {what!r} must be a mapping of arrays")
    return {str(name): np.array(value, dtype=np.float64).reshape(-1) for name, value in state.items()}


def _previous(moments: Moments | None, name: str, size: int) -> np.ndarray | None:
    """One array's saved moment, checked against the model it now applies to."""
    if moments is None:
        return None
    if name not in moments or moments[name].size != size:
        raise ValueError(f"saved optimizer state does not match array {name!r} of the model")
    return moments[name]


class _ServerOptimizer(FedAvg):
    """Streaming FedAvg, then a per-array step from x_t; subclasses define the step."""

    name = "server-optimizer"

    def __init__(self) -> None:
        super().__init__()
        self._current: Mapping[str, np.ndarray] | None = None
        self._round = 0

    def begin_round(self, rnd: int, global_model: Mapping[str, np.ndarray]) -> None:
        """Start a fresh mean; keep a reference to x_t, which the shell must not mutate."""
        super().begin_round(rnd, global_model)
        self._current = global_model
        self._round = rnd

    def finish(self) -> Weights:
        """Step from x_t along the round's mean; commit optimizer state only on success."""
        if self._sum is None or self._current is None:
            raise RuntimeError("finish before begin_round")
        mean = self._sum.mean64()
        self._start_step()
        out: Weights = {}
        for name, x_bar in mean.items():
            x_t = flat(self._current[name]).astype(np.float64)
            stepped = self._step(name, x_t, x_bar)
            out[name] = to_dtype(stepped, self._sum.dtypes[name]).reshape(self._sum.shapes[name])
        self._commit()
        self._sum = None
        return out

    def round_config(self, rnd: int) -> dict[str, Any]:
        """Server optimizers send nothing extra."""
        return {}

    # ---- subclass hooks ------------------------------------------------------------------

    def _start_step(self) -> None:
        """Prepare the new state (kept aside until every array has been stepped)."""

    def _step(self, name: str, x_t: np.ndarray, x_bar: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _commit(self) -> None:
        """Make the new state current."""


class FedAvgM(_ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019), as Flower's FedAvgM.

    g = x_t - x̄; v = g the first time, v = μ·v + g after; x_{t+1} = x_t - η_s·v.
    With μ = 0 no momentum is kept; with η_s = 1 and μ = 0 the result is x̄ itself.
    """

    name = "fedavgm"

    def __init__(self, server_learning_rate: float = 1.0, server_momentum: float = 0.0) -> None:
        super().__init__()
        self.server_learning_rate = float(server_learning_rate)
        self.server_momentum = float(server_momentum)
        self.momentum: Moments | None = None
        self._next: Moments = {}

    def _start_step(self) -> None:
        self._next = {}

    def _step(self, name: str, x_t: np.ndarray, x_bar: np.ndarray) -> np.ndarray:
        if self.server_momentum == 0.0 and self.server_learning_rate == 1.0:
            # Flower skips the server step here, so the mean is returned bit for bit.
            return x_bar
        gradient = x_t - x_bar
        if self.server_momentum > 0.0:
            previous = _previous(self.momentum, name, x_t.size)
            gradient = gradient if previous is None else self.server_momentum * previous + gradient
            self._next[name] = gradient
        result: np.ndarray = x_t - self.server_learning_rate * gradient
        return result

    def _commit(self) -> None:
        if self.server_momentum > 0.0:
            self.momentum = self._next
        self._next = {}

    def state_dict(self) -> StrategyState:
        """{"momentum": {array name: float64 flat array} or None}."""
        return {"momentum": self.momentum}

    def load_state_dict(self, state: StrategyState) -> None:
        """Restore the momentum vector."""
        self.momentum = _load_moments(state.get("momentum"), "momentum")


class _AdaptiveOptimizer(_ServerOptimizer):
    """FedOpt (Reddi et al. 2021): m and v moments of Δ = x̄ - x_t, then x_t + η·m/(√v + τ)."""

    def __init__(self, eta: float, eta_l: float, beta_1: float, beta_2: float, tau: float) -> None:
        super().__init__()
        self.eta = float(eta)
        # Flower accepts the client learning rate but neither uses nor sends it; kept for parity.
        self.eta_l = float(eta_l)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.tau = float(tau)
        self.m: Moments | None = None
        self.v: Moments | None = None
        self.last_round: int | None = None
        self._next_m: Moments = {}
        self._next_v: Moments = {}

    def _start_step(self) -> None:
        self._next_m, self._next_v = {}, {}

    def _first_moment(self, name: str, delta: np.ndarray) -> np.ndarray:
        previous = _previous(self.m, name, delta.size)
        m = (1.0 - self.beta_1) * delta
        if previous is not None:
            m = self.beta_1 * previous + m
        self._next_m[name] = m
        return m

    def _second_moment(self, previous: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _learning_rate(self) -> float:
        return self.eta

    def _step(self, name: str, x_t: np.ndarray, x_bar: np.ndarray) -> np.ndarray:
        delta = x_bar - x_t
        m = self._first_moment(name, delta)
        previous = _previous(self.v, name, delta.size)
        v = self._second_moment(np.zeros_like(delta) if previous is None else previous, delta)
        self._next_v[name] = v
        result: np.ndarray = x_t + self._learning_rate() * m / (np.sqrt(v) + self.tau)
        return result

    def _commit(self) -> None:
        self.m, self.v = self._next_m, self._next_v
        self._next_m, self._next_v = {}, {}
        self.last_round = self._round

    def state_dict(self) -> StrategyState:
        """{"m": {name: float64 flat array} | None, "v": same, "round": last aggregated round | None}."""
        return {"m": self.m, "v": self.v, "round": self.last_round}

    def load_state_dict(self, state: StrategyState) -> None:
        """Restore both moments and the round they were last updated in."""
        self.m = _load_moments(state.get("m"), "m")
        self.v = _load_moments(state.get("v"), "v")
        last = state.get("round")
        self.last_round = None if last is None else int(last)


class FedAdam(_AdaptiveOptimizer):
    """FedAdam as Flower 1.42: Adam moments with a bias-corrected server rate.

    η' = η·√(1 - β2^(r+1)) / (1 - β1^(r+1)), with r the server round.
    """

    name = "fedadam"

    def __init__(
        self,
        eta: float = 0.1,
        eta_l: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(eta, eta_l, beta_1, beta_2, tau)

    def _second_moment(self, previous: np.ndarray, delta: np.ndarray) -> np.ndarray:
        result: np.ndarray = self.beta_2 * previous + (1.0 - self.beta_2) * (delta * delta)
        return result

    def _learning_rate(self) -> float:
        # Flower's exponent is r + 1, not r: round 1 is corrected as Adam's step 2.
        power = self._round + 1.0
        return float(self.eta * np.sqrt(1.0 - self.beta_2**power) / (1.0 - self.beta_1**power))


class FedYogi(_AdaptiveOptimizer):
    """FedYogi: v = v - (1 - β2)·Δ²·sign(v - Δ²); no bias correction."""

    name = "fedyogi"

    def __init__(
        self,
        eta: float = 0.01,
        eta_l: float = 0.0316,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(eta, eta_l, beta_1, beta_2, tau)

    def _second_moment(self, previous: np.ndarray, delta: np.ndarray) -> np.ndarray:
        squared = delta * delta
        result: np.ndarray = previous - (1.0 - self.beta_2) * squared * np.sign(previous - squared)
        return result


class FedAdagrad(_AdaptiveOptimizer):
    """FedAdagrad as Flower: β1 fixed at 0 so m = Δ, and v = v + Δ²."""

    name = "fedadagrad"

    def __init__(self, eta: float = 0.1, eta_l: float = 0.1, tau: float = 1e-3) -> None:
        super().__init__(eta, eta_l, 0.0, 0.0, tau)

    def _first_moment(self, name: str, delta: np.ndarray) -> np.ndarray:
        # With β1 = 0 the first moment is Δ itself; nothing needs keeping.
        return delta

    def _second_moment(self, previous: np.ndarray, delta: np.ndarray) -> np.ndarray:
        result: np.ndarray = previous + delta * delta
        return result

    def _commit(self) -> None:
        super()._commit()
        self.m = None
