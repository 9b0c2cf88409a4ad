"""`fl-orchestrator report`: federated evaluation curves, per-datasite participation, --force."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from fl_orchestrator.cli.report import (
    EX_CANTCREAT,
    INSTALL_HINT,
    ReportError,
    make_report,
    read_evaluations,
    round_row,
)
from fl_orchestrator.cli.report_participation import (
    FAILED,
    NO_RECORD,
    NOT_SELECTED,
    SUCCEEDED,
    TIMED_OUT,
    outcomes_of,
    participation_matrix,
)
from fl_orchestrator.cli.tool_main import main as tool_main

from support.jobs import job_table, site_emails, write_job
from support.records import round_line

NEEDS_MATPLOTLIB = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason=f"matplotlib is not installed (optional extra: {INSTALL_HINT})",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
A, B, C = site_emails(3)


def metrics_line(rnd: int, **overrides: Any) -> dict[str, Any]:
    """A metrics.jsonl line as Reports.append_round writes it."""
    return round_line(rnd, **overrides)


def evaluation_line(rnd: int, **overrides: Any) -> dict[str, Any]:
    """An evaluations.jsonl line as the daemon's _record_evaluation writes it."""
    line: dict[str, Any] = {
        "round": rnd,
        "selected": [A, B],
        "succeeded": [A, B],
        "failed": {},
        "timed_out": [],
        "num_examples": 40,
        "metrics": {"loss": 2.0 / rnd, "accuracy": 0.4 + rnd / 10},
        "seconds": 0.8,
    }
    line.update(overrides)
    return line


def write_lines(path: Path, lines: list[dict[str, Any]], *, tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)


# ---- pure parts -------------------------------------------------------------------------


def test_outcomes_of_a_metrics_line() -> None:
    line = metrics_line(1, selected=[A, B, C, "d@x.org"], succeeded=[A], failed={B: "ValueError"})
    # d@x.org was selected and is in no list: no result when the round closed.
    assert outcomes_of(line) == {A: SUCCEEDED, B: FAILED, C: TIMED_OUT, "d@x.org": TIMED_OUT}
    assert outcomes_of({"round": 1}) == {}
    assert round_row(line).outcomes == outcomes_of(line)


def test_participation_matrix_rows_columns_and_gaps() -> None:
    rounds = [
        (1, {A: SUCCEEDED, B: FAILED}),
        (2, {A: SUCCEEDED, C: TIMED_OUT}),
        (4, {B: SUCCEEDED}),  # round 3 has no line
    ]
    matrix = participation_matrix(rounds)
    assert matrix.rounds == [1, 2, 3, 4]
    assert matrix.datasites == [A, B, C]  # name order
    assert matrix.cells == [
        [SUCCEEDED, SUCCEEDED, NO_RECORD, NOT_SELECTED],
        [FAILED, NOT_SELECTED, NO_RECORD, SUCCEEDED],
        [NOT_SELECTED, TIMED_OUT, NO_RECORD, NOT_SELECTED],
    ]
    assert matrix.left_out == 0
    empty = participation_matrix([])
    assert (empty.rounds, empty.datasites, empty.cells, empty.left_out) == ([], [], [], 0)


def test_participation_matrix_keeps_the_troubled_datasites_when_capped() -> None:
    sites = [f"site{i:04d}@example.org" for i in range(1000)]
    troubled = {sites[7]: FAILED, sites[500]: TIMED_OUT}
    rounds = [
        (rnd, {**dict.fromkeys(sites, SUCCEEDED), **(troubled if rnd == 2 else {})}) for rnd in (1, 2, 3)
    ]
    matrix = participation_matrix(rounds, max_datasites=60)
    assert len(matrix.datasites) == 60 and matrix.left_out == 940
    assert sites[7] in matrix.datasites and sites[500] in matrix.datasites
    assert matrix.datasites == sorted(matrix.datasites)
    assert matrix.cells[matrix.datasites.index(sites[500])] == [SUCCEEDED, TIMED_OUT, SUCCEEDED]


def test_read_evaluations_takes_the_weighted_metrics_per_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert read_evaluations(tmp_path) == {}  # no federated evaluation in this job
    lines = [
        evaluation_line(2),
        evaluation_line(1),
        evaluation_line(3, metrics={}),  # every datasite failed: nothing to draw
        evaluation_line(2, metrics={"loss": 0.5, "note": "text", "bad": None}),  # a later line wins
    ]
    write_lines(tmp_path / "evaluations.jsonl", lines, tail='{"round": 4, "met')
    assert read_evaluations(tmp_path) == {1: {"loss": 2.0, "accuracy": 0.5}, 2: {"loss": 0.5}}
    assert "evaluations.jsonl:5: skipped a line that is not JSON" in capsys.readouterr().err


# ---- the PNG ----------------------------------------------------------------------------


def state_with_evaluations(tmp_path: Path) -> Path:
    """A job file whose state folder holds three rounds and two federated evaluations."""
    job = write_job(tmp_path, job_table(3))
    state = tmp_path / "state"
    write_lines(
        state / "metrics.jsonl",
        [metrics_line(1), metrics_line(2, failed={C: "ValueError"}, timed_out=[]), metrics_line(3)],
    )
    write_lines(state / "evaluations.jsonl", [evaluation_line(1), evaluation_line(3)])
    return job


@NEEDS_MATPLOTLIB
def test_report_draws_federated_evaluation_and_participation_panels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.pyplot as plt

    state_with_evaluations(tmp_path)
    figures: list[Any] = []
    real_close = plt.close

    def keep(fig: Any) -> None:
        figures.append(fig)
        real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    out = tmp_path / "report.png"
    summary = make_report(tmp_path / "state", out, job="testjob", num_rounds=5)
    assert summary == f"{out}: rounds 1..3, federated evaluations of 2 rounds"
    assert out.read_bytes().startswith(PNG_MAGIC)
    (fig,) = figures
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert "accuracy (federated evaluation, last 0.7)" in titles
    assert "loss (federated evaluation, last 0.6667)" in titles
    assert "accuracy (evaluation, last 0.8)" in titles and "loss (training, last 0.3333)" in titles
    assert "participation per round" in titles and "participation per datasite" in titles
    heat = fig.axes[titles.index("participation per datasite")]
    assert [label.get_text() for label in heat.get_yticklabels()] == [A, B, C]
    assert "federated evaluation: the round's model on the datasites' own data" in fig._suptitle.get_text()


@NEEDS_MATPLOTLIB
def test_report_never_overwrites_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = state_with_evaluations(tmp_path)
    out = tmp_path / "report.png"
    out.write_bytes(b"an earlier report")
    args = ["report", "--config", str(job), "--out", str(out)]
    assert tool_main(args) == EX_CANTCREAT
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == f"{out} exists; pass --force to overwrite it\n"
    assert out.read_bytes() == b"an earlier report"
    assert tool_main([*args, "--force"]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    printed_path = capsys.readouterr().out.split(": rounds ")[0]
    assert printed_path == str(out)  # the file it wrote comes first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left


@NEEDS_MATPLOTLIB
def test_report_writes_a_new_file_and_keeps_simulates_call_working(tmp_path: Path) -> None:
    state_with_evaluations(tmp_path)
    out = tmp_path / "new" / "report.png"
    # simulate_cmd and the demo call make_report(state_dir, out, job=..., num_rounds=...).
    assert make_report(tmp_path / "state", out, job="j", num_rounds=3).startswith(str(out))
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ReportError, match="pass --force") as refused:
        make_report(tmp_path / "state", out, job="j", num_rounds=3)
    assert refused.value.exit_code == EX_CANTCREAT
