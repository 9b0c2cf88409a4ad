"""The typed messages of the native protocol and their strict header schemas.

Decoding here is the edge: a file either becomes one of these dataclasses or
one Rejection with a reason code. Nothing else escapes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fl_orchestrator.core.reasons import Reason, Rejection, describe
from fl_orchestrator.wire.frames import (
    FrameLimits,
    Weights,
    decode_arrays,
    decode_header,
    encode_bytes,
    encode_frames,
)
from fl_orchestrator.wire.parts import MAX_PARTS

PROTOCOL_VERSION = 1
# Defaults of the bounds a reader applies; the daemon passes its [limits] values.
MAX_METRICS = 256
MAX_CONFIG_ENTRIES = 256
MAX_NUM_EXAMPLES = 10**12
MetricValue = int | float
Metrics = dict[str, MetricValue]
# The runner's own seconds in the train function. Sent among the metrics, not as a header
# field, so that a daemon older than it still accepts the result (it shows as a metric there).
RUNNER_SECONDS_METRIC = "fl.train_seconds"


def split_runner_seconds(metrics: Metrics) -> tuple[Metrics, float | None]:
    """The train function's own metrics, and the runner's seconds in it (None if not said, or < 0)."""
    own = dict(metrics)
    seconds = own.pop(RUNNER_SECONDS_METRIC, None)
    return own, float(seconds) if seconds is not None and seconds >= 0 else None


_COMMON = {"version", "kind", "job", "round", "message_id", "reply_to", "created", "deadline"}
_KIND_FIELDS = {
    "task": _COMMON | {"attempt", "model", "config", "action"},
    "parts": _COMMON | {"parts", "nbytes", "sha256"},
    "result": _COMMON | {"status", "num_examples", "metrics", "error", "arrays", "action"},
    "heartbeat": _COMMON | {"state"},
    "model": _COMMON | {"arrays"},
}
ANY_FIELD: frozenset[str] = frozenset().union(*_KIND_FIELDS.values())


@dataclass(frozen=True)
class Envelope:
    """Fields every message carries. The sender is never a field: it is the folder."""

    job: str
    round: int
    message_id: str
    reply_to: str | None
    created: float
    deadline: float | None


@dataclass(frozen=True)
class ModelRef:
    """Where a round's global model was written, relative to the job's app folder."""

    path: str
    sha256: str
    nbytes: int
    parts: int = 0  # > 0: the file is split into that many parts (wire/parts.py)


@dataclass(frozen=True)
class TaskMessage:
    """Aggregator -> datasite: train this model with this config."""

    envelope: Envelope
    attempt: int
    model: ModelRef
    config: dict[str, Any]
    action: str = "train"  # or "evaluate": score the model locally, send back metrics only


@dataclass(frozen=True)
class ResultMessage:
    """Datasite -> aggregator: the trained weights, or the error that stopped training."""

    envelope: Envelope
    ok: bool
    num_examples: int
    metrics: Metrics
    error_type: str | None = None
    error_message: str | None = None
    arrays: Weights = field(default_factory=dict)
    action: str = "train"  # "evaluate": an evaluation's metrics, with no arrays


@dataclass(frozen=True)
class HeartbeatMessage:
    """Datasite -> aggregator: the runner is alive."""

    envelope: Envelope
    state: str


@dataclass(frozen=True)
class ModelMessage:
    """A global model as broadcast and as checkpointed."""

    envelope: Envelope
    arrays: Weights


@dataclass(frozen=True)
class PartsMessage:
    """Stands for a message written as parts: their count, total size and sha256."""

    envelope: Envelope
    parts: int
    nbytes: int
    sha256: str


Message = TaskMessage | ResultMessage | HeartbeatMessage | ModelMessage | PartsMessage


def _envelope_fields(kind: str, env: Envelope) -> dict[str, Any]:
    return {
        "version": PROTOCOL_VERSION,
        "kind": kind,
        "job": env.job,
        "round": env.round,
        "message_id": env.message_id,
        "reply_to": env.reply_to,
        "created": env.created,
        "deadline": env.deadline,
    }


def encode_task(task: TaskMessage) -> bytes:
    """Encode a task message."""
    header = _envelope_fields("task", task.envelope)
    header.update(
        attempt=task.attempt,
        model={"path": task.model.path, "sha256": task.model.sha256, "nbytes": task.model.nbytes}
        | ({"parts": task.model.parts} if task.model.parts else {}),
        config=task.config,
    )
    if task.action != "train":
        header["action"] = task.action
    return encode_bytes(header)


def encode_result_frames(result: ResultMessage) -> list[Any]:
    """Encode a result message as buffers to write in order."""
    header = _envelope_fields("result", result.envelope)
    header.update(
        status="ok" if result.ok else "error",
        num_examples=result.num_examples,
        metrics=result.metrics,
        error=None if result.ok else {"type": result.error_type, "message": result.error_message},
    )
    if result.action != "train":
        header["action"] = result.action
    return encode_frames(header, result.arrays if result.ok and result.action == "train" else {})


def encode_heartbeat(beat: HeartbeatMessage) -> bytes:
    """Encode a heartbeat message."""
    header = _envelope_fields("heartbeat", beat.envelope)
    header["state"] = beat.state
    return encode_bytes(header)


def encode_model_frames(model: ModelMessage) -> list[Any]:
    """Encode a global model as buffers to write in order."""
    return encode_frames(_envelope_fields("model", model.envelope), model.arrays)


def sha256_of_frames(frames: list[Any]) -> str:
    """The sha256 of what encode_*_frames will write."""
    digest = hashlib.sha256()
    for chunk in frames:
        digest.update(chunk)
    return digest.hexdigest()


def decode_message(
    buffer: bytes | bytearray | memoryview,
    *,
    expect_kind: str,
    expect_job: str,
    limits: FrameLimits,
    max_metrics: int = MAX_METRICS,
    max_num_examples: int = MAX_NUM_EXAMPLES,
    max_config_entries: int = MAX_CONFIG_ENTRIES,
) -> Message:
    """Decode one file's bytes into a typed message, or raise Rejection.

    Only Rejection escapes, whatever the bytes: every value quoted in a detail
    goes through ``describe`` so that no hostile value is repr'd in full.
    """
    header, offset = decode_header(buffer, limits, first_keys=ANY_FIELD)
    version = header.get("version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise Rejection(Reason.UNSUPPORTED_VERSION, f"version {describe(version)}; this server speaks 1")
    kind = header.get("kind")
    if kind != expect_kind:
        raise Rejection(Reason.WRONG_KIND, f"kind {describe(kind)} where {expect_kind!r} was expected")
    allowed = _KIND_FIELDS[expect_kind]
    extra = sorted(set(header) - allowed, key=repr)  # keys may be str or bytes
    if extra:
        shown = ", ".join(describe(key, 40) for key in extra[:8]) + (", ..." if len(extra) > 8 else "")
        raise Rejection(Reason.UNEXPECTED_FIELD, f"unexpected fields [{shown}]")
    # "action" is optional: absent means "train", as before federated evaluation existed.
    optional = {"action"} | ({"arrays"} if expect_kind == "result" else set())
    missing = sorted(allowed - set(header) - optional)
    if missing:
        raise Rejection(Reason.MISSING_FIELD, f"missing fields {missing}")
    env = _envelope(header)
    if env.job != expect_job:
        raise Rejection(Reason.WRONG_JOB, f"job {env.job!r}; this server runs {expect_job!r}")
    if expect_kind == "heartbeat":
        state = _typed(header, "state", str)
        _no_arrays(buffer, offset)
        return HeartbeatMessage(env, state[:32])
    if expect_kind == "task":
        _no_arrays(buffer, offset)
        return _task(header, env, max_config_entries)
    if expect_kind == "model":
        return ModelMessage(env, decode_arrays(buffer, offset, header.get("arrays"), limits))
    if expect_kind == "parts":
        _no_arrays(buffer, offset)
        return _parts(header, env)
    return _result(header, env, buffer, offset, limits, max_metrics, max_num_examples)


def _envelope(header: Mapping[str, Any]) -> Envelope:
    rnd = _typed(header, "round", int)
    if rnd < 0:
        raise Rejection(Reason.BAD_FIELD, f"round {rnd} is negative")
    message_id = _typed(header, "message_id", str)
    if not (1 <= len(message_id) <= 64) or not (message_id.isascii() and message_id.isalnum()):
        raise Rejection(Reason.BAD_FIELD, "message_id must be 1-64 letters or digits")
    reply_to = header.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, str) or len(reply_to) > 64):
        raise Rejection(Reason.BAD_FIELD, "reply_to must be a string of at most 64 or nil")
    created = _number(header, "created")
    deadline = header.get("deadline")
    if deadline is not None:
        deadline = _number(header, "deadline")
    return Envelope(_typed(header, "job", str), rnd, message_id, reply_to, created, deadline)


def _task(header: Mapping[str, Any], env: Envelope, max_config_entries: int) -> TaskMessage:
    model = header.get("model")
    if not isinstance(model, dict) or set(model) - {"parts"} != {"path", "sha256", "nbytes"}:
        raise Rejection(Reason.BAD_FIELD, "model must be {path, sha256, nbytes} and maybe parts")
    parts = model.get("parts", 0)
    if isinstance(parts, bool) or not isinstance(parts, int) or not 0 <= parts <= MAX_PARTS:
        raise Rejection(Reason.BAD_FIELD, f"model.parts must be an int in 0..{MAX_PARTS}")
    path, sha, nbytes = model["path"], model["sha256"], model["nbytes"]
    if not isinstance(path, str) or ".." in path.split("/") or path.startswith("/"):
        raise Rejection(Reason.BAD_FIELD, "model.path must be a relative path without '..'")
    if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= set("0123456789abcdef"):
        raise Rejection(Reason.BAD_FIELD, "model.sha256 must be 64 hex digits")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise Rejection(Reason.BAD_FIELD, "model.nbytes must be a positive int")
    config = header.get("config")
    if not isinstance(config, dict):
        raise Rejection(Reason.BAD_FIELD, "config must be a map")
    if len(config) > max_config_entries:
        raise Rejection(
            Reason.BAD_FIELD, f"config has {len(config)} entries; the limit is {max_config_entries}"
        )
    if not all(isinstance(key, str) for key in config):
        raise Rejection(Reason.BAD_FIELD, "config keys must be strings")
    ref = ModelRef(path, sha, nbytes, parts)
    return TaskMessage(env, _typed(header, "attempt", int), ref, config, _action(header))


def _parts(header: Mapping[str, Any], env: Envelope) -> PartsMessage:
    count, nbytes, sha = header.get("parts"), header.get("nbytes"), header.get("sha256")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_PARTS:
        raise Rejection(Reason.BAD_FIELD, f"parts must be an int in 1..{MAX_PARTS}")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise Rejection(Reason.BAD_FIELD, "nbytes must be a positive int")
    if not isinstance(sha, str) or len(sha) != 64 or not set(sha) <= set("0123456789abcdef"):
        raise Rejection(Reason.BAD_FIELD, "sha256 must be 64 hex digits")
    return PartsMessage(env, count, nbytes, sha)


def encode_parts(message: PartsMessage) -> bytes:
    """Encode the small file that stands for a message written in parts."""
    header = _envelope_fields("parts", message.envelope)
    header.update(parts=message.parts, nbytes=message.nbytes, sha256=message.sha256)
    return encode_bytes(header)


def _action(header: Mapping[str, Any]) -> str:
    action = header.get("action", "train")
    if action not in ("train", "evaluate"):
        raise Rejection(Reason.BAD_FIELD, f"action {describe(action)}; expected 'train' or 'evaluate'")
    return str(action)


def _result(
    header: Mapping[str, Any],
    env: Envelope,
    buffer: bytes | bytearray | memoryview,
    offset: int,
    limits: FrameLimits,
    max_metrics: int,
    max_num_examples: int,
) -> ResultMessage:
    action = _action(header)
    status = header.get("status")
    if status not in ("ok", "error"):
        raise Rejection(Reason.BAD_FIELD, f"status {describe(status)}; expected 'ok' or 'error'")
    metrics = _metrics(header.get("metrics"), max_metrics)
    if status == "error":
        error = header.get("error")
        if not isinstance(error, dict) or set(error) != {"type", "message"}:
            raise Rejection(Reason.BAD_FIELD, "an error result needs error = {type, message}")
        etype, emsg = error["type"], error["message"]
        if not isinstance(etype, str) or not isinstance(emsg, str):
            raise Rejection(Reason.BAD_FIELD, "error.type and error.message must be strings")
        if header.get("arrays", []) != []:
            raise Rejection(Reason.BAD_FIELD, "an error result carries no arrays")
        _no_arrays(buffer, offset)
        return ResultMessage(env, False, 0, metrics, etype[:200], emsg[:2000], action=action)
    if header.get("error") is not None:
        raise Rejection(Reason.BAD_FIELD, "an ok result carries error = nil")
    num_examples = header.get("num_examples")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int):
        raise Rejection(Reason.BAD_NUM_EXAMPLES, f"num_examples {describe(num_examples)} is not an int")
    if not 0 < num_examples <= max_num_examples:
        raise Rejection(
            Reason.BAD_NUM_EXAMPLES, f"num_examples {num_examples} is outside 1..{max_num_examples}"
        )
    if action == "evaluate":
        if header.get("arrays", []) != []:
            raise Rejection(Reason.BAD_FIELD, "an evaluation result carries no arrays")
        _no_arrays(buffer, offset)
        return ResultMessage(env, True, num_examples, metrics, action=action)
    arrays = decode_arrays(buffer, offset, header.get("arrays"), limits)
    return ResultMessage(env, True, num_examples, metrics, arrays=arrays)


def _metrics(raw: object, max_metrics: int) -> Metrics:
    if not isinstance(raw, dict):
        raise Rejection(Reason.BAD_METRICS, "metrics must be a map")
    if len(raw) > max_metrics:
        raise Rejection(Reason.BAD_METRICS, f"{len(raw)} metrics; the limit is {max_metrics}")
    metrics: Metrics = {}
    for key, value in raw.items():
        if not isinstance(key, str) or len(key) > 128:
            raise Rejection(Reason.BAD_METRICS, "metric names must be strings of at most 128")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Rejection(Reason.BAD_METRICS, f"metric {key!r} is not a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise Rejection(Reason.BAD_METRICS, f"metric {key!r} is not finite")
        metrics[key] = value
    return metrics


def _typed(header: Mapping[str, Any], key: str, kind: type[Any]) -> Any:
    value = header.get(key)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise Rejection(Reason.BAD_FIELD, f"{key} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _number(header: Mapping[str, Any], key: str) -> float:
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Rejection(Reason.BAD_FIELD, f"{key} must be a finite number")
    return float(value)


def _no_arrays(buffer: bytes | bytearray | memoryview, offset: int) -> None:
    if offset != memoryview(buffer).nbytes:
        raise Rejection(Reason.TRAILING_BYTES, "bytes after a message that carries no arrays")


ModelSpec = dict[str, tuple[np.dtype[Any], tuple[int, ...]]]


def model_spec(model: Mapping[str, np.ndarray]) -> ModelSpec:
    """Names, dtypes and shapes of a model: what every result must match."""
    return {name: (array.dtype, tuple(array.shape)) for name, array in model.items()}


def check_weights_match(arrays: Weights, spec: ModelSpec, *, finite: bool = True) -> None:
    """Check names, dtypes and shapes against the global model's spec, and (``finite``) finiteness.

    ``finite=False`` is for a caller that measures the update's norm anyway: a
    finite norm proves every value finite, and only a non-finite one needs
    ``check_finite`` (one pass over the arrays instead of two).
    """
    if arrays.keys() != spec.keys():
        missing = sorted(spec.keys() - arrays.keys())[:5]
        extra = sorted(arrays.keys() - spec.keys())[:5]
        raise Rejection(Reason.ARRAY_NAMES_MISMATCH, f"missing {missing}, unexpected {extra}")
    for name, (dtype, shape) in spec.items():
        got = arrays[name]
        if got.dtype != dtype:
            raise Rejection(Reason.DTYPE_MISMATCH, f"{name}: {got.dtype} where {dtype} expected")
        if got.shape != shape:
            raise Rejection(Reason.SHAPE_MISMATCH, f"{name}: {got.shape} where {shape} expected")
    if finite:
        check_finite(arrays)


def check_finite(arrays: Weights) -> None:
    """Refuse (``non_finite``) arrays holding NaN or Inf."""
    for name, got in arrays.items():
        if got.dtype.kind == "f" and not _all_finite(got):
            raise Rejection(Reason.NON_FINITE, f"{name} holds NaN or Inf")


def _all_finite(array: np.ndarray, block: int = 1 << 16) -> bool:
    flat = array.reshape(-1)
    # Block-wise so the boolean temporary stays in cache for large arrays.
    return all(np.isfinite(flat[start : start + block]).all() for start in range(0, flat.size, block))
