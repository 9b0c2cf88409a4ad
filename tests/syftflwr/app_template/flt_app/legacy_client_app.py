"""The same deterministic owner as client_app.py, written the older way: a NumPyClient behind client_fn.

Flower hands a ``ClientApp(client_fn=...)`` the legacy ``fitins.*`` / ``evaluateins.*``
records and expects ``fitres.*`` / ``evaluateres.*`` back: the shape of the ``server_fn``
projects among syft-flwr's examples (fl-diabetes-prediction). Same variables as
client_app.py: FLT_DELTA, FLT_NUM_EXAMPLES, FLT_FAIL_ROUNDS, FLT_NAME, FLT_TRACE.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import Context

from flt_app.model import summary


class DeltaClient(NumPyClient):
    """Adds FLT_DELTA to every array; weighted by FLT_NUM_EXAMPLES."""

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        server_round = int(config.get("server-round", 0))
        failing = str(server_round) in os.environ.get("FLT_FAIL_ROUNDS", "").split(",")
        _trace("train", parameters, server_round, sorted(config))
        if failing:
            raise RuntimeError(f"FLT_FAIL_ROUNDS: fit fails in server-round {server_round} on purpose")
        delta = float(os.environ.get("FLT_DELTA", "0.0"))
        updated = [(a + np.asarray(delta, dtype=a.dtype)).astype(a.dtype) for a in parameters]
        return updated, int(os.environ.get("FLT_NUM_EXAMPLES", "1")), {"train_loss": delta}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        _trace("evaluate", parameters, int(config.get("server-round", 0)), sorted(config))
        loss = float(np.mean(np.concatenate([a.astype(np.float64).ravel() for a in parameters])))
        return loss, int(os.environ.get("FLT_NUM_EXAMPLES", "1")), {"eval_mean": loss}


def _trace(kind: str, arrays: list[np.ndarray], server_round: int, config_keys: list[str]) -> None:
    path = os.environ.get("FLT_TRACE")
    if not path:
        return
    record = {
        "kind": kind,
        "name": os.environ.get("FLT_NAME", ""),
        "time": time.time(),
        "server_round": server_round,
        "config_keys": config_keys,
        "arrays": summary(arrays),
    }
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


def client_fn(context: Context) -> Client:
    """One client per message, as Flower's legacy runtime builds it."""
    return DeltaClient().to_client()


app = ClientApp(client_fn=client_fn)
