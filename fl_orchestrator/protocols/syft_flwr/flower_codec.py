"""Flower ``Message`` protobufs, built and read with Flower's own definitions.

This is the only module that imports ``flwr`` (the ``[syft-flwr]`` extra), so
the format stays in step with Flower. Content comes in two formats, both built
and read with Flower's own converters:

- ``message``: ``arrays`` / ``config`` / ``metrics`` records, what a Message-API
  ClientApp (``@app.train()``, ``@app.evaluate()``) reads and writes;
- ``legacy``: ``fitins.*`` / ``evaluateins.*`` and ``fitres.*`` /
  ``evaluateres.*`` records, what a ``ClientApp(client_fn=...)`` with a
  NumPyClient reads and writes (the ``server_fn`` projects' owners).

Replies are read in either format, whichever they hold. Arrays travel as Flower ``Array``s,
which Flower writes with ``np.save(allow_pickle=False)`` and reads with
``np.load(allow_pickle=False)``: nothing here unpickles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import Code, EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import MessageType
from flwr.common.recorddict_compat import (
    evaluateins_to_recorddict,
    fitins_to_recorddict,
    recorddict_to_evaluateres,
    recorddict_to_fitres,
)
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from fl_orchestrator.protocols.syft_flwr.envelope import AGGREGATOR_NODE_ID

# The key names syft-flwr's (and Flower's) message API uses.
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"
SERVER_ROUND_KEY = "server-round"
STOP_GROUP_ID = "final"

MESSAGE_TYPES = {"train": MessageType.TRAIN, "evaluate": MessageType.EVALUATE}
CONTENT_FORMATS = ("message", "legacy")
_LEGACY_REPLY_KEYS = {"train": "fitres.parameters", "evaluate": "evaluateres.loss"}


class ReplyError(Exception):
    """A reply body that is not a usable Flower message."""


@dataclass(frozen=True)
class FlowerReply:
    """What the aggregator needs from a decoded reply."""

    message_type: str
    group_id: str
    src_node_id: int
    error_code: int | None = None
    error_reason: str = ""
    arrays: list[tuple[str, np.ndarray]] = field(default_factory=list)
    metrics: dict[str, float | int] = field(default_factory=dict)
    dropped_metrics: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True unless the owner answered with a Flower error."""
        return self.error_code is None


def round_content(
    arrays: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    *,
    purpose: str = "train",
    content_format: str = "message",
) -> RecordDict:
    """A round's content, built once and sent to every selected owner."""
    if content_format == "legacy":
        # Flower's legacy Parameters carry no names: the model's order is the order.
        parameters = ndarrays_to_parameters([np.ascontiguousarray(a) for a in arrays.values()])
        if purpose == "evaluate":
            return evaluateins_to_recorddict(EvaluateIns(parameters, dict(config)), keep_input=True)
        return fitins_to_recorddict(FitIns(parameters, dict(config)), keep_input=True)
    record = ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})
    return RecordDict({ARRAYS_KEY: record, CONFIG_KEY: ConfigRecord(dict(config))})


def request_body(
    content: RecordDict,
    *,
    purpose: str,
    dst_node_id: int,
    run_id: int,
    group_id: str,
    ttl_seconds: float,
) -> bytes:
    """A serialized instruction message, with the metadata syft-flwr's own server sets."""
    message = Message(
        content=content,
        dst_node_id=dst_node_id,
        message_type=MESSAGE_TYPES[purpose],
        ttl=max(1.0, ttl_seconds),
        group_id=group_id,
    )
    return _serialize(message, run_id)


def stop_body(*, dst_node_id: int, run_id: int, reason: str) -> bytes:
    """The SYSTEM message that makes a syft-flwr owner's main.py exit."""
    content = RecordDict({CONFIG_KEY: ConfigRecord({"action": "stop", "reason": reason})})
    message = Message(
        content=content,
        dst_node_id=dst_node_id,
        message_type=MessageType.SYSTEM,
        ttl=60.0,
        group_id=STOP_GROUP_ID,
    )
    return _serialize(message, run_id)


def serialize(message: Message, run_id: int) -> bytes:
    """A message's bytes, with the run id and the aggregator as its source (as syft-flwr sends)."""
    return _serialize(message, run_id)


def _serialize(message: Message, run_id: int) -> bytes:
    # Metadata has no setters for these: syft-flwr's server writes them the same way.
    message.metadata.__dict__["_run_id"] = run_id
    message.metadata.__dict__["_src_node_id"] = AGGREGATOR_NODE_ID
    data: bytes = message_to_proto(message).SerializeToString()
    return data


def parse_reply(body: bytes) -> FlowerReply:
    """Decode a reply body; raise ReplyError with a reason if it is not a Flower reply."""
    proto = ProtoMessage()
    try:
        proto.ParseFromString(body)
        message = message_from_proto(proto)
    except Exception as exc:  # protobuf and Flower raise many types for bad bytes
        raise ReplyError(f"not a Flower message: {type(exc).__name__}: {exc}") from None
    metadata = message.metadata
    if message.has_error():
        return FlowerReply(
            metadata.message_type,
            metadata.group_id,
            metadata.src_node_id,
            error_code=int(message.error.code),
            error_reason=str(message.error.reason),
        )
    if not message.has_content():
        raise ReplyError("a reply with neither content nor error")
    content = message.content
    legacy_key = _LEGACY_REPLY_KEYS.get(metadata.message_type, "")
    if legacy_key in content.array_records or legacy_key in content.metric_records:
        return _parse_legacy(metadata, content)
    arrays: list[tuple[str, np.ndarray]] = []
    if ARRAYS_KEY in content.array_records:
        try:
            arrays = [(name, array.numpy()) for name, array in content.array_records[ARRAYS_KEY].items()]
        except Exception as exc:
            raise ReplyError(f"its arrays do not load: {type(exc).__name__}: {exc}") from None
    return _ok_reply(metadata, arrays, content.metric_records.get(METRICS_KEY, {}))


def _parse_legacy(metadata: Any, content: RecordDict) -> FlowerReply:
    """A NumPyClient's ``fitres.*`` / ``evaluateres.*`` reply, read with Flower's converters."""
    try:
        if metadata.message_type == MessageType.TRAIN:
            fit = recorddict_to_fitres(content, keep_input=True)
            status, count, extra = fit.status, fit.num_examples, fit.metrics
            found = parameters_to_ndarrays(fit.parameters)
            arrays = [(str(index), np.asarray(array)) for index, array in enumerate(found)]
            loss: dict[str, Any] = {}
        else:
            scored = recorddict_to_evaluateres(content)
            status, count, extra = scored.status, scored.num_examples, scored.metrics
            arrays, loss = [], {"loss": scored.loss}
    except Exception as exc:  # Flower's converters raise KeyError, TypeError, ValueError, ...
        raise ReplyError(f"not a legacy Flower reply: {type(exc).__name__}: {exc}") from None
    if status.code != Code.OK:
        return FlowerReply(
            metadata.message_type,
            metadata.group_id,
            metadata.src_node_id,
            error_code=int(status.code.value),
            error_reason=f"the client's status: {status.code.name}: {status.message}",
        )
    counted = {**loss, **dict(extra), NUM_EXAMPLES_KEY: count if isinstance(count, int) else -1}
    return _ok_reply(metadata, arrays, counted)


def _ok_reply(metadata: Any, arrays: list[tuple[str, np.ndarray]], metrics: Mapping[str, Any]) -> FlowerReply:
    """A successful reply: its arrays, and its finite scalar metrics (the others named as dropped)."""
    kept, dropped = _scalars(metrics)
    return FlowerReply(
        metadata.message_type,
        metadata.group_id,
        metadata.src_node_id,
        arrays=arrays,
        metrics=kept,
        dropped_metrics=tuple(dropped),
    )


def _scalars(values: Mapping[str, Any]) -> tuple[dict[str, float | int], list[str]]:
    """The finite int and float metrics, and the names of the others (the native metrics are scalars)."""
    kept: dict[str, float | int] = {}
    dropped: list[str] = []
    for key, value in values.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value))
        ):
            dropped.append(key)
        else:
            kept[key] = value
    return kept, dropped


def content_format_hint(error_reason: str) -> str:
    """What to change when an owner's ClientApp could not find the records it reads ("" if that is not it)."""
    if any(f"KeyError: '{key}.parameters'" in error_reason for key in ("fitins", "evaluateins")):
        return (
            "the owners run a ClientApp(client_fn=...) (NumPyClient), which reads Flower's legacy"
            ' records: set [syft_flwr] content_format = "legacy"'
        )
    if "KeyError: 'arrays'" in error_reason or "KeyError: 'config'" in error_reason:
        return (
            "the owners run a Message-API ClientApp (@app.train()), which reads arrays/config"
            ' records: set [syft_flwr] content_format = "message"'
        )
    return ""
