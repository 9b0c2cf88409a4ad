"""A ``server_fn`` ServerApp with Flower's older FedAvg (flwr.server.strategy), as fl-diabetes-prediction has.

Only read by ``fl-orchestrator init --from-syft-flwr`` in these tests: the strategy's
settings and initial parameters become the job. FLT_MIN_NODES: min_fit_clients and
min_available_clients (default 3).
"""

from __future__ import annotations

import os

from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg

from flt_app.model import initial_arrays


def server_fn(context: Context) -> ServerAppComponents:
    """FedAvg over every owner, each global model evaluated by every owner."""
    min_nodes = int(os.environ.get("FLT_MIN_NODES", "3"))
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_evaluate_clients=min_nodes,
        min_fit_clients=min_nodes,
        min_available_clients=min_nodes,
        initial_parameters=ndarrays_to_parameters(initial_arrays()),
    )
    return ServerAppComponents(
        config=ServerConfig(num_rounds=int(context.run_config["num-server-rounds"])), strategy=strategy
    )


app = ServerApp(server_fn=server_fn)
