"""Central DP with server-side fixed clipping, as Flower's DifferentialPrivacyServerSideFixedClipping.

Each result's update u = x_k - x_t is scaled to global L2 norm at most C
(whole model concatenated), the wrapped strategy aggregates the clipped models
x_t + u·min(1, C/||u||), and Gaussian noise N(0, (z·C/m)²) is added to every
coordinate of the aggregate. The noise comes from a seeded numpy Generator
whose state is part of ``state_dict``, so a restarted server continues the
same noise stream.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fl_orchestrator.aggregation.base import Strategy, StrategyState, Weights
from fl_orchestrator.aggregation.chunks import CHUNK_ELEMENTS, check_updates, layout_of, to_dtype
from fl_orchestrator.aggregation.clipping import ClippedUpdate, clip_factor, update_norm


def encode_rng(generator: np.random.Generator) -> dict[str, Any]:
    """The generator's state with its 128-bit integers as decimal strings (msgpack ints stop at 64 bits)."""
    state = generator.bit_generator.state
    if state["bit_generator"] != "PCG64":
        raise ValueError(f"cannot save a {state['bit_generator']} generator")
    return {
        "bit_generator": "PCG64",
        "state": str(state["state"]["state"]),
        "inc": str(state["state"]["inc"]),
        "has_uint32": int(state["has_uint32"]),
        "uinteger": int(state["uinteger"]),
    }


def decode_rng(encoded: Mapping[str, Any]) -> np.random.Generator:
    """A generator continuing from what encode_rng saved."""
    if encoded.get("bit_generator") != "PCG64":
        raise ValueError("saved noise generator state is not PCG64")
    bit_generator = np.random.PCG64()
    bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": int(encoded["state"]), "inc": int(encoded["inc"])},
        "has_uint32": int(encoded["has_uint32"]),
        "uinteger": int(encoded["uinteger"]),
    }
    return np.random.Generator(bit_generator)


class DifferentialPrivacyFixedClipping:
    """Wrap a strategy with server-side clipping and Gaussian noise.

    ``streaming`` follows the wrapped strategy: clipping is applied per result
    as it is folded, or lazily per slice for a whole-set strategy. The noise
    scale divides by ``num_sampled_clients`` when it is positive (Flower's
    behaviour), else by the number of results actually aggregated.
    """

    name = "dp_fixed_clipping"

    def __init__(
        self,
        strategy: Strategy,
        *,
        clipping_norm: float,
        noise_multiplier: float,
        num_sampled_clients: int = 0,
        seed: int = 0,
        chunk_elements: int = CHUNK_ELEMENTS,
    ) -> None:
        if clipping_norm <= 0:
            raise ValueError("clipping_norm must be > 0")
        if noise_multiplier < 0:
            raise ValueError("noise_multiplier must be >= 0")
        self.strategy = strategy
        self.streaming = strategy.streaming
        self.clipping_norm = float(clipping_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.num_sampled_clients = int(num_sampled_clients)
        self.chunk_elements = chunk_elements
        self.rng = np.random.default_rng(seed)
        self.last_scales: list[float] = []
        self._base: Mapping[str, np.ndarray] | None = None

    def begin_round(self, rnd: int, global_model: Mapping[str, np.ndarray]) -> None:
        """Remember x_t (not to be mutated by the shell) and start the wrapped strategy."""
        self._base = global_model
        self.last_scales = []
        self.strategy.begin_round(rnd, global_model)

    def _clip(self, update: Mapping[str, np.ndarray]) -> ClippedUpdate:
        if self._base is None:
            raise RuntimeError("fold before begin_round")
        check_updates([update], layout_of(self._base))
        norm = update_norm(update, self._base, block=self.chunk_elements)
        return ClippedUpdate(update, self._base, clip_factor(norm, self.clipping_norm))

    def fold(self, update: Mapping[str, np.ndarray], num_examples: int) -> None:
        """Clip one result and fold it into the wrapped strategy."""
        clipped = self._clip(update)
        self.strategy.fold(clipped, num_examples)
        self.last_scales.append(clipped.scale)

    def aggregate_all(self, updates: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int]) -> None:
        """Clip every result (lazily for whole-set strategies) and hand them on."""
        clipped = [self._clip(update) for update in updates]
        self.strategy.aggregate_all(clipped, num_examples)
        self.last_scales.extend(view.scale for view in clipped)

    def finish(self) -> Weights:
        """The wrapped strategy's model plus Gaussian noise of std z·C/m."""
        aggregated = self.strategy.finish()
        count = self.num_sampled_clients if self.num_sampled_clients > 0 else len(self.last_scales)
        std = self.noise_multiplier * self.clipping_norm / max(count, 1)
        if std == 0.0:
            return aggregated
        noisy: Weights = {}
        for name, array in aggregated.items():
            noise = self.rng.normal(0.0, std, size=array.shape)
            noisy[name] = to_dtype(array.astype(np.float64) + noise, array.dtype)
        return noisy

    def round_config(self, rnd: int) -> dict[str, Any]:
        """Whatever the wrapped strategy sends."""
        return self.strategy.round_config(rnd)

    def state_dict(self) -> StrategyState:
        """{"rng": encoded PCG64 state, "strategy": the wrapped strategy's state_dict()}."""
        return {"rng": encode_rng(self.rng), "strategy": self.strategy.state_dict()}

    def load_state_dict(self, state: StrategyState) -> None:
        """Restore the noise stream and the wrapped strategy's state."""
        if state.get("rng") is not None:
            self.rng = decode_rng(state["rng"])
        self.strategy.load_state_dict(state.get("strategy") or {})
