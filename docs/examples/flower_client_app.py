"""A Flower ClientApp (Message API) that trains under fl-orchestrator's native protocol.

Run it on a datasite with (Flower installed there; the coordinator never needs it):

    fl-orchestrator datasite --syftbox-root ~/SyftBox --email owner@hospital-a.org \\
        --aggregator coordinator@example.org --job myjob \\
        --client-app flower_client_app:app --node-config-value partition-id=0

The train handler moves each array a step ``lr`` (the job's ``train_config``, as
``context.run_config``) towards this datasite's own target, ``partition-id + 1``
(``context.node_config``, set by the data owner): a stand-in for local training
that needs no data set. The same file runs under ``flwr run`` unchanged.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _target(context: Context) -> float:
    return float(context.node_config.get("partition-id", 0)) + 1.0


def _examples(context: Context) -> int:
    return 10 * (int(context.node_config.get("partition-id", 0)) + 1)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One step of every array towards this datasite's target."""
    lr = float(context.run_config.get("lr", 0.1))
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    target = _target(context)
    trained = [(a + lr * (target - a)).astype(a.dtype) for a in arrays]
    loss = float(np.mean([np.mean((target - a) ** 2) for a in trained]))
    metrics = MetricRecord({"num-examples": _examples(context), "loss": loss})
    return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The mean squared distance of the global model from this datasite's target."""
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    target = _target(context)
    loss = float(np.mean([np.mean((target - a) ** 2) for a in arrays]))
    metrics = MetricRecord({"num-examples": _examples(context), "loss": loss})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
