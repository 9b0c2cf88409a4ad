"""Names shared by the contract tests (imported as a top-level module: this folder has no __init__)."""

from __future__ import annotations

from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "app_template"
AGGREGATOR = "agg@example.org"
OWNER = "ds0@example.org"
APP_NAME = f"{AGGREGATOR}_fltapp_1700000000"
RPC_APP = f"flwr/{APP_NAME}"
AGGREGATOR_NODE_ID = 1  # syft_flwr.fl_orchestrator.syft_grid.AGGREGATOR_NODE_ID
