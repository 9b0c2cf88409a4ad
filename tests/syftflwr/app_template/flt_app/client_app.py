"""A deterministic ClientApp (Flower 1.25 message API), configured by environment variables.

FLT_DELTA         float added to every array element (dtypes are kept); default 0.0
FLT_NUM_EXAMPLES  int reported as "num-examples" (the FedAvg weight); default 1
FLT_FAIL_ROUNDS   comma-separated server-rounds in which train raises; default none
FLT_SLOW_ROUNDS   comma-separated server-rounds in which train sleeps FLT_SLOW_SECONDS
                  (default 1.0) before it answers: a reply that arrives while the
                  daemon is down
FLT_NAME          a label written into the trace; default ""
FLT_TRACE         if set, one JSON line per call is appended to this file: the round,
                  the request's metadata and the arrays received (every value of a small
                  model, per-array sums of a large one)
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flt_app.model import summary

app = ClientApp()


def _delta() -> float:
    return float(os.environ.get("FLT_DELTA", "0.0"))


def _num_examples() -> int:
    return int(os.environ.get("FLT_NUM_EXAMPLES", "1"))


def _rounds(variable: str) -> set[int]:
    raw = os.environ.get(variable, "")
    return {int(part) for part in raw.split(",") if part.strip()}


def _fail_rounds() -> set[int]:
    return _rounds("FLT_FAIL_ROUNDS")


def _trace(kind: str, msg: Message, arrays: list[np.ndarray] | None, **extra: Any) -> None:
    path = os.environ.get("FLT_TRACE")
    if not path:
        return
    meta = msg.metadata
    record: dict[str, Any] = {
        "kind": kind,
        "name": os.environ.get("FLT_NAME", ""),
        "pid": os.getpid(),
        "time": time.time(),
        "metadata": {
            "run_id": meta.run_id,
            "message_id": meta.message_id,
            "src_node_id": meta.src_node_id,
            "dst_node_id": meta.dst_node_id,
            "reply_to_message_id": meta.reply_to_message_id,
            "group_id": meta.group_id,
            "created_at": meta.created_at,
            "ttl": meta.ttl,
            "message_type": meta.message_type,
        },
        "record_keys": sorted(msg.content.keys()) if msg.has_content() else [],
        **extra,
    }
    if arrays is not None:
        record["arrays"] = {"keys": list(cast(ArrayRecord, msg.content["arrays"]).keys()), **summary(arrays)}
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Return every received array plus FLT_DELTA, weighted by FLT_NUM_EXAMPLES."""
    server_round = int(cast(int, msg.content["config"]["server-round"]))
    arrays = cast(ArrayRecord, msg.content["arrays"]).to_numpy_ndarrays()
    failing = server_round in _fail_rounds()
    _trace("train", msg, arrays, server_round=server_round, raised=failing)
    if failing:
        raise RuntimeError(f"FLT_FAIL_ROUNDS: train fails in server-round {server_round} on purpose")
    if server_round in _rounds("FLT_SLOW_ROUNDS"):
        time.sleep(float(os.environ.get("FLT_SLOW_SECONDS", "1.0")))
    delta = _delta()
    updated = [(a + np.asarray(delta, dtype=a.dtype)).astype(a.dtype) for a in arrays]
    metrics = MetricRecord({"num-examples": _num_examples(), "train_loss": delta * server_round})
    content = RecordDict({"arrays": ArrayRecord(updated), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Report a loss that depends only on the received arrays (their mean)."""
    arrays = cast(ArrayRecord, msg.content["arrays"]).to_numpy_ndarrays()
    server_round = int(cast(int, msg.content["config"]["server-round"]))
    _trace("evaluate", msg, arrays, server_round=server_round, raised=False)
    loss = float(np.mean(np.concatenate([a.astype(np.float64).ravel() for a in arrays])))
    metrics = MetricRecord({"num-examples": _num_examples(), "eval_loss": loss})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Federated analytics: a histogram of this owner's FLT_NUM_EXAMPLES values, all equal to FLT_DELTA.

    ``config["bins"]`` edges from ``config["low"]`` to ``config["high"]``; the reply holds the
    counts and the number of values, as fed-analytics-diabetes's owners answer.
    """
    config = cast(Any, msg.content["config"])
    edges = np.linspace(float(config["low"]), float(config["high"]), int(config["bins"]) + 1)
    values = np.full(_num_examples(), _delta())
    counts, _ = np.histogram(values, bins=edges)
    _trace("query", msg, None)
    metrics = MetricRecord({"counts": [int(c) for c in counts], "n": int(values.size)})
    return Message(RecordDict({"histogram": metrics}), reply_to=msg)
