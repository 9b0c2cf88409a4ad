"""Streaming FedAvg: a float64 running sum of num_examples-weighted updates.

Memory is one float64 accumulator the size of the model, whatever the number
of datasites: each result is folded in as it arrives and then released.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fl_orchestrator.aggregation.base import RoundSkipped, StrategyBase, Weights

# Elements per block: the float64 slice of the accumulator plus the incoming
# float32 slice stay inside a typical L2 cache.
BLOCK_ELEMENTS = 1 << 15


class WeightedSum:
    """sum_i w_i * x_i and sum_i w_i, accumulated in float64 block by block."""

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        self.dtypes = {name: array.dtype for name, array in reference.items()}
        self.shapes = {name: array.shape for name, array in reference.items()}
        self.sums = {name: np.zeros(array.size, dtype=np.float64) for name, array in reference.items()}
        self.total_weight = 0.0
        self.count = 0
        self._scratch = np.empty(BLOCK_ELEMENTS, dtype=np.float64)

    def add(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        """Add weight * update."""
        for name, total in self.sums.items():
            flat = np.asarray(update[name]).reshape(-1)
            for start in range(0, flat.size, BLOCK_ELEMENTS):
                stop = min(start + BLOCK_ELEMENTS, flat.size)
                scratch = self._scratch[: stop - start]
                # dtype: the product itself in float64, not a float32 product cast afterwards.
                np.multiply(flat[start:stop], weight, out=scratch, casting="unsafe", dtype=np.float64)
                total[start:stop] += scratch
        self.total_weight += weight
        self.count += 1

    def mean64(self) -> Weights:
        """The weighted mean as flat float64 arrays (what server optimizers step from)."""
        if self.count == 0:
            raise RoundSkipped("no results were folded into this round")
        if self.total_weight <= 0:
            raise RoundSkipped("every result of this round reported num_examples = 0")
        return {name: total / self.total_weight for name, total in self.sums.items()}

    def mean(self) -> Weights:
        """The weighted mean, cast back to each array's dtype."""
        if self.count == 0 or self.total_weight <= 0:
            self.mean64()  # raises RoundSkipped with the reason
        out: Weights = {}
        for name, total in self.sums.items():
            dtype = self.dtypes[name]
            if dtype.kind in "iub":
                mean = np.rint(total / self.total_weight).astype(dtype)
            else:
                # Straight into the model's dtype: no second float64 model-sized temporary.
                mean = np.divide(total, self.total_weight, out=np.empty(total.shape, dtype), casting="unsafe")
            out[name] = mean.reshape(self.shapes[name])
        return out


class FedAvg(StrategyBase):
    """Flower's FedAvg: the num_examples-weighted mean of the results."""

    name = "fedavg"
    streaming = True

    def __init__(self) -> None:
        self._sum: WeightedSum | None = None

    def begin_round(self, rnd: int, global_model: Mapping[str, np.ndarray]) -> None:
        """Start a fresh aggregate against the model sent this round."""
        self._sum = WeightedSum(global_model)

    def fold(self, update: Mapping[str, np.ndarray], num_examples: int) -> None:
        """Add one accepted result."""
        if self._sum is None:
            raise RuntimeError("fold before begin_round")
        self._sum.add(update, float(num_examples))

    def finish(self) -> Weights:
        """Return the weighted mean."""
        if self._sum is None:
            raise RuntimeError("finish before begin_round")
        result = self._sum.mean()
        self._sum = None
        return result


class FedProx(FedAvg):
    """Flower's FedProx: FedAvg on the server; clients add (mu/2)·||w - w_t||² to their loss.

    The server's only part is to send ``proximal-mu`` in every round's config.
    """

    name = "fedprox"

    def __init__(self, proximal_mu: float = 0.0) -> None:
        super().__init__()
        self.proximal_mu = float(proximal_mu)

    def round_config(self, rnd: int) -> dict[str, Any]:
        """Tell the clients the proximal term's weight, under Flower's key."""
        return {"proximal-mu": self.proximal_mu}
