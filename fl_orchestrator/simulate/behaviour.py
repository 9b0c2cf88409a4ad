"""What a simulated datasite runs: the data scientist's own code, made slow or flaky on request.

Each simulated datasite process runs ``train`` (or ``client_app``) from here,
which loads the real train function (or ClientApp) named in its environment
and calls it unchanged, after:

- ``slow``: sleeping ``FL_SIMULATE_SLOW_SECONDS`` (more than the round
  timeout), so the round counts it as a straggler;
- ``flaky``: raising in every even round, so the round counts a failure.

``normal`` calls straight through.
"""

from __future__ import annotations

import os
import time
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


def _behave(rnd: int) -> None:
    behaviour = os.environ.get(ENV_BEHAVIOUR, "normal")
    if behaviour == "slow":
        time.sleep(float(os.environ.get(ENV_SLOW_SECONDS, "1")))
    elif behaviour == "flaky" and rnd % 2 == 0:
        raise SimulatedFailure(f"simulated failure in round {rnd} (--flaky)")


def train(arrays: dict[str, Any], config: dict[str, Any], context: TaskContext) -> Any:
    """The real train function, after this datasite's simulated behaviour."""
    _behave(context.round)
    return call_with_context(load_callable(os.environ[ENV_TRAIN], what=ENV_TRAIN), arrays, config, context)


def evaluate(arrays: dict[str, Any], config: dict[str, Any], context: TaskContext) -> Any:
    """The real evaluate function, unchanged (behaviours apply to training)."""
    function = load_callable(os.environ[ENV_EVALUATE], what=ENV_EVALUATE)
    return call_with_context(function, arrays, config, context)


class _BehavingApp:
    """The real ClientApp, called after this datasite's simulated behaviour (train messages only)."""

    def __call__(self, message: Any, context: Any) -> Any:
        app = load_callable(os.environ[ENV_CLIENT_APP], what=ENV_CLIENT_APP)
        if message.metadata.message_type == "train":
            group = str(message.metadata.group_id)
            _behave(int(group) if group.isdigit() else 0)
        return app(message, context)


client_app = _BehavingApp()
