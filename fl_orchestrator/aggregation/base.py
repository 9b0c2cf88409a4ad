"""The strategy interface: how results become the next global model.

Pure numpy: no I/O, no event loop. The shell calls ``begin_round`` once per
attempt, ``fold`` once per accepted result (in a worker thread, one at a time),
and ``finish`` once the round closes. Strategies that cannot stream set
``streaming = False`` and get ``aggregate_all`` with every accepted update.

``docs/STRATEGIES.md`` describes the contract in full, including the shape of
``state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

Weights = dict[str, np.ndarray]
StrategyState = dict[str, Any]


class RoundSkipped(ValueError):
    """The strategy cannot produce a model from this round's results.

    The message says why (for example too few results for Bulyan). The global
    model is unchanged and the strategy's state is untouched, so the shell may
    keep the current model and go on, as Flower does when a strategy returns
    no arrays.
    """


class Strategy(Protocol):
    """What the daemon needs from an aggregation strategy."""

    name: str
    streaming: bool

    def begin_round(self, rnd: int, global_model: Mapping[str, np.ndarray]) -> None:
        """Start a fresh aggregate against the model sent this round."""

    def fold(self, update: Mapping[str, np.ndarray], num_examples: int) -> None:
        """Add one accepted result (streaming strategies)."""

    def aggregate_all(self, updates: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int]) -> None:
        """Take every accepted result at once (non-streaming strategies)."""

    def finish(self) -> Weights:
        """Return the next global model, in the global model's dtypes."""

    def round_config(self, rnd: int) -> dict[str, Any]:
        """Extra values the strategy sends to datasites in the round's config."""

    def state_dict(self) -> StrategyState:
        """State that must survive a restart (optimizer moments, RNG, ...)."""

    def load_state_dict(self, state: StrategyState) -> None:
        """Restore what state_dict returned."""


class StrategyBase:
    """Defaults for a custom strategy: subclass it and override what you need.

    A streaming subclass overrides ``begin_round``, ``fold`` and ``finish``; a
    whole-set one sets ``streaming = False`` and overrides ``aggregate_all``
    too. The default ``aggregate_all`` folds each update in turn.
    """

    name = "custom"
    streaming = True

    def begin_round(self, rnd: int, global_model: Mapping[str, np.ndarray]) -> None:
        """Start a fresh aggregate against the model sent this round."""
        raise NotImplementedError

    def fold(self, update: Mapping[str, np.ndarray], num_examples: int) -> None:
        """Add one accepted result."""
        raise NotImplementedError

    def aggregate_all(self, updates: Sequence[Mapping[str, np.ndarray]], num_examples: Sequence[int]) -> None:
        """Fold every update in turn."""
        for update, n in zip(updates, num_examples, strict=True):
            self.fold(update, n)

    def finish(self) -> Weights:
        """Return the next global model."""
        raise NotImplementedError

    def round_config(self, rnd: int) -> dict[str, Any]:
        """Nothing extra by default."""
        return {}

    def state_dict(self) -> StrategyState:
        """No state by default."""
        return {}

    def load_state_dict(self, state: StrategyState) -> None:
        """Nothing to restore by default."""
