"""Everything the daemon writes as JSON parses as JSON: no bare NaN or Infinity anywhere."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import structlog

from fl_orchestrator.cli.logs import configure_logging
from fl_orchestrator.storage.jsonl import append_json_line, json_safe


def strict(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, as every other JSON parser does."""

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_with_their_raw_text_beside_them() -> None:
    value = {"loss": math.inf, "acc": 0.5, "nested": {"x": -math.inf}, "list": [1.0, math.nan]}
    assert json_safe(value) == {
        "loss": None,
        "loss_raw": "inf",
        "acc": 0.5,
        "nested": {"x": None, "x_raw": "-inf"},
        "list": [1.0, None],
    }


def test_metrics_lines_stay_json(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append_json_line(path, {"round": 1, "evaluate_metrics": {"loss": math.nan}})
    (line,) = path.read_text().splitlines()
    assert strict(line)["evaluate_metrics"] == {"loss": None, "loss_raw": "nan"}


def test_json_log_lines_stay_json() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        structlog.get_logger("t").info("round.completed", train_metrics={"loss": -math.inf}, norm=math.inf)
    finally:
        structlog.reset_defaults()
    event = strict(out.getvalue().strip())
    assert event["train_metrics"] == {"loss": None, "loss_raw": "-inf"}
    assert event["norm"] is None and event["norm_raw"] == "inf"


def test_waiting_for_nodes_is_reported_once_a_second_not_once_a_heartbeat() -> None:
    from fl_orchestrator.daemon.action_log import WaitingLog

    waiting = WaitingLog()
    # A thousand heartbeats in half a second: one line; a new round or a second later: another.
    assert [waiting.due(1, 100.0 + i / 2000) for i in range(1000)].count(True) == 1
    assert waiting.due(1, 101.2) and waiting.due(2, 101.3) and not waiting.due(2, 101.4)
