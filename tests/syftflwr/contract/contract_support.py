"""Names and helpers shared by the contract tests.

Imported as a top-level module (``contract_support``): this folder has no ``__init__``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from syft_flwr.fl_orchestrator.flower_client import MessageHandler, RequestProcessor

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "app_template"
AGGREGATOR = "agg@example.org"
OWNER = "ds0@example.org"
APP_NAME = f"{AGGREGATOR}_fltapp_1700000000"
RPC_APP = f"flwr/{APP_NAME}"
MESSAGES_URL = f"syft://{OWNER}/app_data/{RPC_APP}/rpc/messages"
AGGREGATOR_NODE_ID = 1  # syft_flwr.fl_orchestrator.syft_grid.AGGREGATOR_NODE_ID


class StopRecorder:
    """Stands in for the DO's events adapter: records stop()."""

    def __init__(self) -> None:
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def request_processor(client_app: Any, events: Any) -> RequestProcessor:
    """The DO's request handler, wired as syft_flwr.fl_orchestrator.flower_client wires it (no encryption)."""
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    return RequestProcessor(MessageHandler(client_app, context, False), events, OWNER)


def make_processor(client_app: Any) -> tuple[RequestProcessor, StopRecorder]:
    """The DO's request handler over a ``StopRecorder``, and that recorder."""
    events = StopRecorder()
    return request_processor(client_app, events), events
