"""The job as Prometheus metrics, in the text format node_exporter's textfile collector reads.

Written with status.json (the same snapshot, at most every 15 s and at the
end), atomically, so a scrape never sees half a file. No server and no dependency: point
node_exporter's ``--collector.textfile.directory`` at the folder of
``[daemon] prometheus_textfile_path`` (default ``<state_dir>/fl_orchestrator.prom``).
Counters are the job's totals since its first run; a restart resumes them from
the checkpointed accounting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeGuard

from fl_orchestrator.core.machine import Phase

PHASES = tuple(str(phase) for phase in Phase)
STATES = ("running", "done", "failed", "stopped")

# (name, type, help, key in a datasite's status record)
_PER_DATASITE = (
    ("selected_total", "counter", "Rounds the datasite was asked to train in.", "selected"),
    ("succeeded_total", "counter", "Results of the datasite counted in a round.", "succeeded"),
    ("failed_total", "counter", "Failed results the datasite reported.", "failed"),
    ("timed_out_total", "counter", "Rounds the datasite missed the deadline of.", "timed_out"),
    ("rejected_total", "counter", "Results of the datasite the round refused.", "rejected"),
    ("last_seen_timestamp_seconds", "gauge", "When the datasite was last seen (epoch).", "last_seen"),
    (
        "train_seconds_total",
        "counter",
        "The datasite runner's own time in its train function.",
        "runner_train_seconds_total",
    ),
    (
        "turnaround_seconds_total",
        "counter",
        "Dispatch to counted result, summed over the datasite's successes.",
        "train_seconds_total",
    ),
)


def render(status: Mapping[str, Any], last_round: Mapping[str, Any] | None, totals: Mapping[str, Any]) -> str:
    """The exposition text for one status snapshot, the last completed round and running totals."""
    job = {"job": str(status.get("job", ""))}
    out: list[str] = []
    _family(out, "round", "gauge", "The job's current round.", [(job, status.get("round"))])
    _family(out, "num_rounds", "gauge", "Rounds the job runs.", [(job, status.get("num_rounds"))])
    phase = str(status.get("phase", ""))
    _family(
        out,
        "phase",
        "gauge",
        "1 for the phase the job is in.",
        [({**job, "phase": p}, int(p == phase)) for p in PHASES],
    )
    state = str(status.get("state", ""))
    _family(
        out,
        "state",
        "gauge",
        "1 for the job's state.",
        [({**job, "state": s}, int(s == state)) for s in STATES],
    )
    _family(
        out,
        "updated_timestamp_seconds",
        "gauge",
        "When this was written (epoch).",
        [(job, status.get("updated"))],
    )
    _family(
        out,
        "deadline_timestamp_seconds",
        "gauge",
        "End of the open attempt or wait.",
        [(job, status.get("deadline"))],
    )
    selected, answered = status.get("selected") or [], status.get("answered") or []
    _family(out, "attempt_selected", "gauge", "Datasites asked in the open attempt.", [(job, len(selected))])
    _family(
        out, "attempt_answered", "gauge", "Of them, those whose result was counted.", [(job, len(answered))]
    )
    for name, help_text in (
        ("rounds_completed_total", "Rounds aggregated since the job's first run."),
        ("bytes_written_total", "Bytes of models and tasks this run published."),
    ):
        _family(out, name, "counter", help_text, [(job, totals.get(name))])
    if last_round:
        for key, help_text in (
            ("collect_seconds", "Dispatch to close of the last completed round."),
            ("aggregate_seconds", "Aggregation time of the last completed round."),
        ):
            _family(out, f"last_round_{key}", "gauge", help_text, [(job, last_round.get(key))])
        metrics = last_round.get("evaluate_metrics") or {}
        _family(
            out,
            "last_round_evaluate",
            "gauge",
            "Central evaluation of the last completed round, by metric.",
            [({**job, "metric": str(k)}, v) for k, v in sorted(metrics.items())],
        )
    datasites: Mapping[str, Mapping[str, Any]] = status.get("datasites") or {}
    quarantined: Mapping[str, Mapping[str, int]] = status.get("quarantined") or {}
    _per_datasite(out, job, datasites)
    _family(
        out,
        "datasite_quarantined_total",
        "counter",
        "Files of the datasite refused and quarantined, by reason.",
        [
            ({**job, "datasite": name, "reason": str(reason)}, count)
            for name, reasons in sorted(quarantined.items())
            for reason, count in sorted(reasons.items())
        ],
    )
    return "".join(out)


def _per_datasite(out: list[str], job: Mapping[str, str], datasites: Mapping[str, Mapping[str, Any]]) -> None:
    """The per-datasite families; each datasite's labels are escaped once, not once per family.

    At 1,000 datasites these are 8,000 lines, rendered in a worker thread that holds the
    interpreter lock meanwhile: its time is time the event loop may wait (detection p99).
    """
    labelled = [(_labels({**job, "datasite": name}), record) for name, record in sorted(datasites.items())]
    for suffix, kind, help_text, key in _PER_DATASITE:
        name = f"fl_orchestrator_datasite_{suffix}"
        lines = [
            f"{name}{labels} {_value(value)}\n"
            for labels, record in labelled
            if _number(value := record.get(key))
        ]
        if lines:
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
            out.extend(lines)


def _family(
    out: list[str], name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, str], Any]]
) -> None:
    lines = [f"fl_orchestrator_{name}{_labels(labels)} {_value(v)}\n" for labels, v in samples if _number(v)]
    if lines:
        out.append(f"# HELP fl_orchestrator_{name} {help_text}\n# TYPE fl_orchestrator_{name} {kind}\n")
        out.extend(lines)


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _value(value: float) -> str:
    return str(int(value)) if isinstance(value, int) else repr(float(value))


_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})


def _labels(labels: Mapping[str, str]) -> str:
    # The text format escapes backslash, double quote and newline in label values.
    return "{" + ",".join(f'{key}="{value.translate(_ESCAPES)}"' for key, value in labels.items()) + "}"
