"""The daemon's Prometheus textfile: read back with Prometheus's own parser."""

from __future__ import annotations

import math
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from fl_orchestrator.daemon import prometheus

STATUS: dict[str, Any] = {
    "job": 'odd "job"\\name',
    "state": "running",
    "phase": "training",
    "round": 3,
    "num_rounds": 10,
    "updated": 1796628000.5,
    "deadline": 1796628060.0,
    "selected": ["a@x.org", "b@x.org"],
    "answered": ["a@x.org"],
    "bytes_written_total": 4096,
    "datasites": {
        "a@x.org": {
            "selected": 3,
            "succeeded": 3,
            "failed": 0,
            "timed_out": 0,
            "rejected": 1,
            "last_seen": 1796627999.0,
            "runner_train_seconds_total": 1.5,
            "train_seconds_total": 2.0,
        },
        "b@x.org": {
            "selected": 3,
            "succeeded": 2,
            "failed": 1,
            "timed_out": 0,
            "rejected": 0,
            "last_seen": None,
            "runner_train_seconds_total": 0.0,
            "train_seconds_total": 1.0,
        },
    },
    "quarantined": {"a@x.org": {"malformed": 7, "bad_name": 1}},
}
LAST_ROUND = {
    "collect_seconds": 0.25,
    "aggregate_seconds": 0.01,
    "evaluate_metrics": {"accuracy": 0.9, "loss": math.nan},
}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_the_file_parses_and_says_where_the_job_is() -> None:
    text = prometheus.render(STATUS, LAST_ROUND, {"rounds_completed_total": 2, "bytes_written_total": 4096})
    samples = _samples(text)
    job = (("job", STATUS["job"]),)  # quotes and backslashes survive the escaping
    assert samples[("fl_orchestrator_round", job)] == 3
    assert samples[("fl_orchestrator_num_rounds", job)] == 10
    phases = {k[1][1][1]: v for k, v in samples.items() if k[0] == "fl_orchestrator_phase"}
    assert phases["training"] == 1 and sum(phases.values()) == 1
    assert samples[("fl_orchestrator_attempt_selected", job)] == 2
    assert samples[("fl_orchestrator_attempt_answered", job)] == 1
    assert samples[("fl_orchestrator_rounds_completed_total", job)] == 2
    assert samples[("fl_orchestrator_bytes_written_total", job)] == 4096
    assert samples[("fl_orchestrator_last_round_collect_seconds", job)] == 0.25
    assert (
        samples[("fl_orchestrator_last_round_evaluate", (("job", STATUS["job"]), ("metric", "accuracy")))]
        == 0.9
    )


def test_per_datasite_counters_and_no_sample_for_what_is_unknown() -> None:
    samples = _samples(prometheus.render(STATUS, LAST_ROUND, {}))
    a = (("datasite", "a@x.org"), ("job", STATUS["job"]))
    b = (("datasite", "b@x.org"), ("job", STATUS["job"]))
    assert samples[("fl_orchestrator_datasite_succeeded_total", a)] == 3
    assert samples[("fl_orchestrator_datasite_failed_total", b)] == 1
    assert samples[("fl_orchestrator_datasite_train_seconds_total", a)] == 1.5
    assert samples[("fl_orchestrator_datasite_turnaround_seconds_total", a)] == 2.0
    assert ("fl_orchestrator_datasite_last_seen_timestamp_seconds", b) not in samples  # never seen
    reason = (("datasite", "a@x.org"), ("job", STATUS["job"]), ("reason", "malformed"))
    assert samples[("fl_orchestrator_datasite_quarantined_total", reason)] == 7
    # A NaN metric is left out rather than written as a sample nobody can graph.
    nan = ("fl_orchestrator_last_round_evaluate", (("job", STATUS["job"]), ("metric", "loss")))
    assert nan not in samples


def test_a_status_file_from_the_first_moments_still_renders() -> None:
    text = prometheus.render({"job": "j", "state": "running", "phase": "starting"}, None, {})
    assert _samples(text)[("fl_orchestrator_phase", (("job", "j"), ("phase", "starting")))] == 1
