"""A custom-loop ServerApp, the shape of syft-flwr's fed-analytics-diabetes: query, then aggregate.

It waits for FLT_MIN_NODES owners (default 2), sends each a QUERY message asking for a
histogram, sums the counts and writes the result to $FLT_ANALYTICS_OUT as JSON. It never
calls a strategy: it uses the grid directly, so it runs with `fl-orchestratord --server-app`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, cast

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import MessageType
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Query every owner for a histogram, once, and write the sum."""
    wanted = int(os.environ.get("FLT_MIN_NODES", "2"))
    deadline = time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while len(nodes) < wanted and time.monotonic() < deadline:
        time.sleep(0.2)
        nodes = list(grid.get_node_ids())
    question = ConfigRecord({"bins": 4, "low": -2.0, "high": 2.0})
    messages = [
        grid.create_message(RecordDict({"config": question}), MessageType.QUERY, node, group_id="histogram")
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=30))
    total = [0, 0, 0, 0]
    answered, errors = 0, []
    for reply in cast(list[Message], replies):
        if reply.has_error():
            errors.append(reply.error.reason)
            continue
        answered += 1
        counts = cast(Any, reply.content["histogram"])["counts"]
        total = [a + int(b) for a, b in zip(total, counts, strict=True)]
    out = os.environ.get("FLT_ANALYTICS_OUT")
    if out:
        with open(out, "w", encoding="utf-8") as handle:
            json.dump({"nodes": len(nodes), "answered": answered, "errors": errors, "counts": total}, handle)
