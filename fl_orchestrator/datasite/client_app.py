"""A Flower ClientApp (Message API) as the runner's train and evaluate functions.

``fl-orchestrator datasite --client-app package.module:app`` runs a data
owner's existing ClientApp on the native protocol's tasks. Flower is needed
here only, on the datasite (the ``[flower]`` extra); the coordinator never
imports it. Each task becomes the message Flower's own runtime would deliver:

- the model's arrays as an ``ArrayRecord`` under ``"arrays"`` and the task's
  config (the job's train_config, with ``server-round``) as a ``ConfigRecord``
  under ``"config"``, in a ``train`` or ``evaluate`` message;
- the ``Context``: ``run_config`` is the job's train_config, ``node_config``
  the datasite's identity (``email``, ``node-id``) and the data owner's own
  settings (``--node-config``), never anything from the coordinator.

The reply's ``ArrayRecord`` (by name, or by position as Flower lists send
them) and its ``MetricRecord`` with ``num-examples`` become our result. A
handler that raises, or a Flower error reply, becomes a counted failure whose
message holds the first lines of the traceback.
"""

from __future__ import annotations

import traceback
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"
_TRACEBACK_LINES = 6


class ClientAppError(Exception):
    """The ClientApp raised or answered with an error; the message holds what it said."""


def node_id_of(email: str) -> int:
    """The datasite's Flower node id: crc32 of its email, as syft-flwr numbers data owners."""
    return zlib.crc32(email.encode())


class ClientAppRunner:
    """Calls a ClientApp's train and evaluate handlers with our tasks' arrays and config."""

    def __init__(self, app: Any, *, email: str, node_config: Mapping[str, Any]) -> None:
        self.app = app
        self.email = email
        self.node_id = node_id_of(email)
        self.node_config = {"email": email, "node-id": self.node_id, **dict(node_config)}

    def train(self, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
        """Our train(arrays, config): (arrays, num_examples, metrics)."""
        reply = self._call("train", arrays, config)
        content = reply.content
        if ARRAYS_KEY not in content.array_records:
            raise ClientAppError(f"the train reply holds no ArrayRecord under {ARRAYS_KEY!r}")
        returned = [(name, array.numpy()) for name, array in content.array_records[ARRAYS_KEY].items()]
        num_examples, metrics = _metrics(content)
        return _by_model_names(returned, list(arrays)), num_examples, metrics

    def evaluate(self, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> Any:
        """Our evaluate(arrays, config): (num_examples, metrics)."""
        reply = self._call("evaluate", arrays, config)
        return _metrics(reply.content)

    def _call(self, purpose: str, arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> Any:
        from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
        from flwr.common.constant import MessageType

        content = RecordDict(
            {
                ARRAYS_KEY: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
                CONFIG_KEY: ConfigRecord(dict(config)),
            }
        )
        message_type = MessageType.TRAIN if purpose == "train" else MessageType.EVALUATE
        message = Message(
            content=content,
            dst_node_id=self.node_id,
            message_type=message_type,
            group_id=str(config.get("server-round", "")),
        )
        run_config = {k: v for k, v in config.items() if k != "server-round"}
        context = Context(
            run_id=0,
            node_id=self.node_id,
            node_config=dict(self.node_config),
            state=RecordDict(),
            run_config=run_config,
        )
        try:
            reply = self.app(message, context)
        except Exception as exc:
            lines = traceback.format_exception(exc)
            head = "".join(lines[-_TRACEBACK_LINES:]).strip()
            raise ClientAppError(f"{type(exc).__name__}: {exc} | {head}") from None
        if reply.has_error():
            raise ClientAppError(f"Flower error {reply.error.code}: {reply.error.reason}")
        if not reply.has_content():
            raise ClientAppError("the reply has neither content nor error")
        return reply


def _metrics(content: Any) -> tuple[int, dict[str, float | int]]:
    if METRICS_KEY not in content.metric_records:
        raise ClientAppError(f"the reply holds no MetricRecord under {METRICS_KEY!r}")
    metrics = dict(content.metric_records[METRICS_KEY])
    count = metrics.pop(NUM_EXAMPLES_KEY, None)
    if isinstance(count, bool) or not isinstance(count, int | float) or count < 0 or count != int(count):
        raise ClientAppError(f"metrics[{NUM_EXAMPLES_KEY!r}] must be a whole number >= 0, got {count!r}")
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return int(count), scalars


def _by_model_names(returned: list[tuple[str, np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    """The reply's arrays under the model's names: by name, or by position (Flower lists send "0", "1")."""
    by_name = dict(returned)
    if set(by_name) == set(names):
        return {name: by_name[name] for name in names}
    if len(returned) != len(names):
        raise ClientAppError(f"{len(returned)} arrays in the reply; the model has {len(names)}")
    return {name: array for name, (_, array) in zip(names, returned, strict=True)}
