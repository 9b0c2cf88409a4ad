"""Two small custom strategies, selected in job.toml by import string.

    [strategy]
    name = "custom_strategy:SmoothedFedAvg"   # module must be importable by the daemon
    alpha = 0.5                               # keys other than name go to the constructor

``SmoothedFedAvg`` streams: it folds each result into a running sum as it
arrives and keeps a little state across restarts. ``WinsorizedMean`` needs
every result at once: it sets ``streaming = False`` and reads the updates
slice by slice with the helpers in ``fl_orchestrator.aggregation.chunks``, so
memmap-backed updates never have to be loaded whole.

Run ``python docs/examples/custom_strategy.py`` to see one round of each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fl_orchestrator.aggregation.base import RoundSkipped, StrategyBase, StrategyState, Weights
from fl_orchestrator.aggregation.chunks import (
    check_updates,
    empty_model,
    layout_of,
    ranges,
    shaped,
    stack_block,
    to_dtype,
)
from fl_orchestrator.aggregation.fedavg import WeightedSum


class SmoothedFedAvg(StrategyBase):
    """x_{t+1} = (1 - alpha)·x_t + alpha·FedAvg(results): a damped FedAvg.

    The state records how many rounds were aggregated, to show state_dict.
    """

    name = "smoothed-fedavg"
    streaming = True

    def __init__(self, alpha: float = 0.5) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.rounds_aggregated = 0
        self._sum: WeightedSum | None = None
        self._sent: Mapping[str, np.ndarray] = {}

    def begin_round(self, rnd: int, global_model: Mapping[str, np.ndarray]) -> None:
        self._sum = WeightedSum(global_model)
        self._sent = global_model

    def fold(self, update: Mapping[str, np.ndarray], num_examples: int) -> None:
        assert self._sum is not None, "fold before begin_round"
        self._sum.add(update, float(num_examples))

    def finish(self) -> Weights:
        assert self._sum is not None, "finish before begin_round"
        mean = self._sum.mean64()
        out = {}
        for name, sent in self._sent.items():
            mixed = (1.0 - self.alpha) * np.asarray(sent, dtype=np.float64).reshape(-1) + self.alpha * mean[
                name
            ]
            out[name] = to_dtype(mixed, sent.dtype).reshape(sent.shape)
        self.rounds_aggregated += 1
        return out

    def round_config(self, rnd: int) -> dict[str, float]:
        # Anything returned here reaches every datasite in the round's config.
        return {"server-alpha": self.alpha}

    def state_dict(self) -> StrategyState:
        return {"rounds_aggregated": self.rounds_aggregated}

    def load_state_dict(self, state: StrategyState) -> None:
        self.rounds_aggregated = int(state.get("rounds_aggregated", 0))


class WinsorizedMean(StrategyBase):
    """Per coordinate, clamp the results to their [q, 1 - q] quantiles, then average them."""

    name = "winsorized-mean"
    streaming = False

    def __init__(self, quantile: float = 0.1, chunk_elements: int = 1 << 16) -> None:
        self.quantile = quantile
        self.chunk_elements = chunk_elements
        self._updates: list[Mapping[str, np.ndarray]] = []

    def begin_round(self, rnd: int, global_model: Mapping[str, np.ndarray]) -> None:
        self._layout = layout_of(global_model)
        self._updates = []

    def fold(self, update: Mapping[str, np.ndarray], num_examples: int) -> None:
        self.aggregate_all([update], [num_examples])

    def aggregate_all(self, updates: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int]) -> None:
        check_updates(updates, self._layout)
        self._updates.extend(updates)  # references only: the reading happens in finish

    def finish(self) -> Weights:
        if not self._updates:
            raise RoundSkipped("no results to aggregate")
        out = empty_model(self._layout)
        for name, spec in self._layout.items():
            for start, stop in ranges(spec.size, self.chunk_elements):
                block = stack_block(self._updates, name, start, stop)  # (N, chunk) float64
                low, high = np.quantile(block, [self.quantile, 1.0 - self.quantile], axis=0)
                out[name][start:stop] = to_dtype(np.clip(block, low, high).mean(axis=0), spec.dtype)
        self._updates = []
        return shaped(out, self._layout)


def main() -> None:
    """One round of each strategy on four results, one of them an outlier."""
    sent = {"w": np.zeros(3, dtype=np.float32)}
    results = [{"w": np.full(3, v, dtype=np.float32)} for v in (1.0, 2.0, 3.0, 1000.0)]

    smoothed = SmoothedFedAvg(alpha=0.5)
    smoothed.begin_round(1, sent)
    for result in results:
        smoothed.fold(result, num_examples=10)
    print("smoothed-fedavg:", smoothed.finish()["w"], smoothed.state_dict())

    winsorized = WinsorizedMean(quantile=0.25)
    winsorized.begin_round(1, sent)
    winsorized.aggregate_all(results, [10] * len(results))
    print("winsorized-mean:", winsorized.finish()["w"])


if __name__ == "__main__":
    main()
