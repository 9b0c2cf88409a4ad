"""The syft-flwr side's own ServerApp: FedAvg from a fixed initial model (comparison runs only).

FLT_INITIAL_NPZ   the initial model (see model.py); default model.default_arrays()
FLT_ROUND_TIMEOUT seconds each round waits for replies; default run config "round-timeout"
FLT_MIN_NODES     FedAvg's min_train_nodes and min_available_nodes; default 2
FLT_SERVER_TRACE  if set, one JSON line before round 1 and after each round: the time and
                  the global model (see model.summary), and one at the end
FLT_SERVER_FINAL  if set, the final model is written there as .npz (the initial file's names)
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flt_app.model import ENV_INITIAL_NPZ, initial_arrays, summary

app = ServerApp()


def _write_trace(record: dict[str, Any]) -> None:
    path = os.environ.get("FLT_SERVER_TRACE")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


def _after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
    """Called by Strategy.start before round 1 (0) and after every round: a clock."""
    now = time.time()
    _write_trace({"kind": "round", "round": server_round, "time": now, **summary(arrays.to_numpy_ndarrays())})
    return None


def _save_final(arrays: ArrayRecord) -> None:
    path = os.environ.get("FLT_SERVER_FINAL")
    if not path:
        return
    values = arrays.to_numpy_ndarrays()
    source = os.environ.get(ENV_INITIAL_NPZ)
    names = list(np.load(source, allow_pickle=False).files) if source else []
    if len(names) != len(values):
        names = [f"arr_{i}" for i in range(len(values))]
    np.savez(path, **dict(zip(names, values, strict=True)))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg for num-server-rounds rounds, evaluation off by default."""
    config = context.run_config
    num_rounds = int(config["num-server-rounds"])
    timeout = float(os.environ.get("FLT_ROUND_TIMEOUT", str(config["round-timeout"])))
    min_nodes = int(os.environ.get("FLT_MIN_NODES", "2"))
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=float(config["fraction-evaluate"]),
        min_train_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )
    _write_trace({"kind": "start", "time": time.time(), "timeout": timeout, "num_rounds": num_rounds})
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial_arrays()),
        num_rounds=num_rounds,
        timeout=timeout,
        train_config=ConfigRecord({"lr": float(config["lr"])}),
        evaluate_fn=_after_round,
    )
    _write_trace({"kind": "final", "time": time.time()})
    _save_final(result.arrays)
