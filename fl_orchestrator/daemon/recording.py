"""Between the machine and the round log: what to record, and how to replay it.

Only decisions that cannot be recomputed after a crash are recorded: the
dispatch (it depended on who was present), each counted result (it depended
on arrival order) and a close on the deadline (it depended on the clock).
Replaying those records through a machine restored from the last checkpoint
reproduces the round exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

from fl_orchestrator.core import events as ev
from fl_orchestrator.intake.reader import ResultHandle
from fl_orchestrator.intake.safe_read import FileIdentity
from fl_orchestrator.storage.round_log import CloseRecord, DispatchRecord, Record, ResultRecord
from fl_orchestrator.wire.messages import ResultMessage


def records_for(
    rnd: int, attempt: int, event: ev.Event, actions: list[ev.Action]
) -> list[tuple[int, Record]]:
    """The (round, record) pairs that must be durable before these actions take effect."""
    records: list[tuple[int, Record]] = []
    counted = any(isinstance(a, (ev.Accept, ev.RecordFailure)) for a in actions)
    if isinstance(event, ev.ResultReceived) and counted:
        handle: ResultHandle = event.payload
        identity = handle.identity
        assert event.reply_to is not None
        result = ResultRecord(
            attempt=attempt,
            datasite=event.datasite,
            reply_to=event.reply_to,
            ok=event.ok,
            num_examples=event.num_examples,
            metrics=dict(event.metrics),
            error_type=event.error_type,
            error_message=event.error_message,
            path=str(handle.path),
            identity=(identity.inode, identity.size, identity.mtime_ns),
            at=event.now,
            sha256=handle.sha256,
            # Strict JSON in the log: an overflowed norm is not a reference anyway.
            update_norm=event.update_norm
            if event.update_norm is not None and math.isfinite(event.update_norm)
            else None,
        )
        records.append((rnd, result))
    if isinstance(event, ev.Tick):
        for action in actions:
            if isinstance(action, (ev.Aggregate, ev.AbandonAttempt)):
                records.append((rnd, CloseRecord(action.summary.attempt, event.now)))
                break
    for action in actions:
        # Federated evaluation is best effort and not replayed after a crash.
        if isinstance(action, ev.Dispatch) and action.purpose == "train":
            dispatch = DispatchRecord(action.attempt, action.tasks, action.created, action.deadline)
            records.append((action.round, dispatch))
    return records


def handle_of(record: ResultRecord, message: ResultMessage | None = None) -> ResultHandle:
    """The handle of a recorded result; ``message`` is the file as read again after a restart."""
    return ResultHandle(Path(record.path), FileIdentity(*record.identity), record.sha256, message)


def event_for_record(
    record: ResultRecord | CloseRecord, rnd: int, message: ResultMessage | None = None
) -> ev.Event:
    """The machine event a recorded result or close replays as.

    ``message`` is the result's file read again and checked against the
    recorded sha256 (the shell does that before replaying it).
    """
    if isinstance(record, CloseRecord):
        return ev.Tick(record.at)
    return ev.ResultReceived(
        now=record.at,
        datasite=record.datasite,
        round=rnd,
        reply_to=record.reply_to,
        ok=record.ok,
        num_examples=record.num_examples,
        metrics=record.metrics,
        error_type=record.error_type,
        error_message=record.error_message,
        payload=handle_of(record, message),
        update_norm=record.update_norm,
    )
