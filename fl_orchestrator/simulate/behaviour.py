"""What a simulated datasite runs: the data scientist's own code, made slow or flaky on request.

A simulated datasite calls the real train function (or ClientApp) unchanged,
after its ``Behaviour``:

- ``slow``: waiting ``slow_seconds`` (more than the round timeout), so the
  round counts it as a straggler;
- ``flaky``: raising in every even round, so the round counts a failure;
- ``normal``: calling straight through.

A datasite process reads its behaviour and the code's import strings from its
environment (``train``, ``evaluate`` and ``client_app`` below); the in-process
runners of simulate/pool.py build the same wrappers with ``wrap_*``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fl_orchestrator.config.hooks import load_callable
from fl_orchestrator.datasite.outputs import TaskContext, call_with_context

ENV_TRAIN = "FL_SIMULATE_TRAIN"
ENV_EVALUATE = "FL_SIMULATE_EVALUATE"
ENV_CLIENT_APP = "FL_SIMULATE_CLIENT_APP"
ENV_BEHAVIOUR = "FL_SIMULATE_BEHAVIOUR"
ENV_SLOW_SECONDS = "FL_SIMULATE_SLOW_SECONDS"
BEHAVIOURS = ("normal", "slow", "flaky")


class SimulatedFailure(RuntimeError):
    """A flaky simulated datasite failing on purpose."""


@dataclass(frozen=True)
class Behaviour:
    """How one simulated datasite misbehaves before running the real code."""

    kind: str = "normal"
    slow_seconds: float = 1.0
    # Set when the simulation stops, so a slow datasite's wait ends with it.
    stopping: threading.Event = field(default_factory=threading.Event, compare=False)

    @classmethod
    def from_env(cls) -> Behaviour:
        """A datasite process's behaviour, from the variables simulate set for it."""
        return cls(os.environ.get(ENV_BEHAVIOUR, "normal"), float(os.environ.get(ENV_SLOW_SECONDS, "1")))

    def before_train(self, rnd: int) -> None:
        """Wait (slow) or raise (flaky, even rounds); nothing for a normal datasite."""
        if self.kind == "slow":
            self.stopping.wait(self.slow_seconds)
        elif self.kind == "flaky" and rnd % 2 == 0:
            raise SimulatedFailure(f"simulated failure in round {rnd} (--flaky)")


def wrap_train(function: Callable[..., Any], behaviour: Behaviour) -> Callable[..., Any]:
    """The real train function, after the behaviour."""

    def train(arrays: dict[str, Any], config: dict[str, Any], context: TaskContext) -> Any:
        behaviour.before_train(context.round)
        return call_with_context(function, arrays, config, context)

    return train


def wrap_evaluate(function: Callable[..., Any]) -> Callable[..., Any]:
    """The real evaluate function, unchanged (behaviours apply to training)."""

    def evaluate(arrays: dict[str, Any], config: dict[str, Any], context: TaskContext) -> Any:
        return call_with_context(function, arrays, config, context)

    return evaluate


class BehavingApp:
    """The real ClientApp, called after the behaviour (train messages only)."""

    def __init__(self, app: Callable[[Any, Any], Any], behaviour: Behaviour) -> None:
        self.app = app
        self.behaviour = behaviour

    def __call__(self, message: Any, context: Any) -> Any:
        if message.metadata.message_type == "train":
            group = str(message.metadata.group_id)
            self.behaviour.before_train(int(group) if group.isdigit() else 0)
        return self.app(message, context)


def train(arrays: dict[str, Any], config: dict[str, Any], context: TaskContext) -> Any:
    """A datasite process's train: the function named in its environment, after its behaviour."""
    function = load_callable(os.environ[ENV_TRAIN], what=ENV_TRAIN)
    return wrap_train(function, Behaviour.from_env())(arrays, config, context)


def evaluate(arrays: dict[str, Any], config: dict[str, Any], context: TaskContext) -> Any:
    """A datasite process's evaluate: the function named in its environment."""
    return wrap_evaluate(load_callable(os.environ[ENV_EVALUATE], what=ENV_EVALUATE))(arrays, config, context)


def client_app(message: Any, context: Any) -> Any:
    """A datasite process's ClientApp: the one named in its environment, after its behaviour."""
    app = load_callable(os.environ[ENV_CLIENT_APP], what=ENV_CLIENT_APP)
    return BehavingApp(app, Behaviour.from_env())(message, context)
