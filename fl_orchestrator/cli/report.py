"""`fl-orchestrator report`: training curves and participation as one PNG.

Reads ``<state_dir>/metrics.jsonl`` (one line per completed round) and, when
there is one, ``<state_dir>/evaluations.jsonl`` (one line per federated
evaluation), and draws per round: each central evaluation metric, each
federated evaluation metric (weighted over the datasites by num_examples), each
train metric (the mean over the round's results, weighted by num_examples), who
took part as stacked bars (succeeded / failed / timed out), and each datasite's
outcome per round. An existing PNG is replaced only with ``force``.
matplotlib is an optional extra; it is imported only here, so the daemon and the
other tools never need it.
"""

from __future__ import annotations

import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_orchestrator.cli.report_participation import (
    draw_participation,
    outcomes_of,
    panel_height,
    participation_matrix,
)
from fl_orchestrator.daemon.reports import EVALUATIONS_FILE, METRICS_FILE
from fl_orchestrator.storage.atomic import atomic_write, write_durably
from fl_orchestrator.storage.jsonl import read_json_lines

EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73
INSTALL_HINT = "pip install 'fl-orchestrator[plot]'"

# A count the evaluate function reports beside its metrics (the demo's does): a
# flat line, not a learning curve, so it gets no panel.
_NOT_CURVES = frozenset({"num_examples"})
_MAX_CURVES = 8  # per group; more panels would be unreadable at any size
_MAX_BARS = 150  # more rounds than this are drawn as stacked areas


class ReportError(Exception):
    """The report cannot be made; carries the exit code to use."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RoundRow:
    """What the report needs from one metrics.jsonl line."""

    round: int
    attempt: int
    succeeded: int
    failed: int
    timed_out: int
    evaluate: dict[str, float] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)  # datasite -> report_participation code


def _metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    out = {}
    for key, item in value.items():
        if isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item):
            out[str(key)] = float(item)
    return out


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (list, dict)) else 0


def round_row(item: dict[str, Any]) -> RoundRow:
    """One metrics.jsonl line as a RoundRow; ValueError/KeyError/TypeError if it is not one."""
    return RoundRow(
        round=int(item["round"]),
        attempt=int(item.get("attempt") or 1),
        succeeded=_size(item.get("succeeded")),
        failed=_size(item.get("failed")),
        timed_out=_size(item.get("timed_out")),
        evaluate=_metrics(item.get("evaluate_metrics")),
        train=_metrics(item.get("train_metrics")),
        outcomes=outcomes_of(item),
    )


def _lines(path: Path) -> list[dict[str, Any]]:
    def torn(number: int, excerpt: str) -> None:
        print(f"warning: {path}:{number}: skipped a line that is not JSON: {excerpt!r}", file=sys.stderr)

    try:
        return list(read_json_lines(path, on_torn=torn))
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror}", EX_NOINPUT) from None


def read_rounds(state_dir: Path) -> list[RoundRow]:
    """Parse metrics.jsonl into rows sorted by round (a torn or foreign line is skipped)."""
    path = state_dir / METRICS_FILE
    if not path.exists():
        raise ReportError(f"no metrics yet at {path}: has a round completed?", EX_NOINPUT)
    rows: dict[int, RoundRow] = {}
    for item in _lines(path):
        try:
            row = round_row(item)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line this tool cannot read
        rows[row.round] = row
    if not rows:
        raise ReportError(f"no completed rounds in {path}", EX_NOINPUT)
    return [rows[r] for r in sorted(rows)]


def read_evaluations(state_dir: Path) -> dict[int, dict[str, float]]:
    """Round -> federated evaluation metrics from evaluations.jsonl ({} without the file).

    The metrics of a line are already the daemon's mean over the datasites that
    answered, weighted by num_examples. A later line for a round replaces an earlier one.
    """
    path = state_dir / EVALUATIONS_FILE
    evaluations: dict[int, dict[str, float]] = {}
    for item in _lines(path):
        rnd = item.get("round")
        metrics = _metrics(item.get("metrics"))
        if isinstance(rnd, int) and not isinstance(rnd, bool) and metrics:
            evaluations[rnd] = metrics
    return dict(sorted(evaluations.items()))


Series = dict[str, list[tuple[int, float]]]


def _series(by_round: list[tuple[int, dict[str, float]]]) -> Series:
    """Metric name -> (round, value) points, for at most _MAX_CURVES metrics."""
    names: set[str] = set()
    for _, metrics in by_round:
        names.update(metrics)
    return {
        name: [(rnd, metrics[name]) for rnd, metrics in by_round if name in metrics]
        for name in sorted(names - _NOT_CURVES)[:_MAX_CURVES]
    }


def _columns(panels: int) -> int:
    """2 or 3 panels a row, whichever leaves fewer empty cells (3 on a tie: fewer rows)."""
    if panels <= 1:
        return 1
    return min((3, 2), key=lambda cols: -panels % cols)


def import_pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend; ReportError(69) if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError(
            f"report needs matplotlib, which is not installed: {INSTALL_HINT}", EX_UNAVAILABLE
        ) from None
    # Agg renders to files without a display: the tool runs on headless servers.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _legend(groups: set[str]) -> list[str]:
    return [
        "evaluation: the global model on the central data after each round"
        if "evaluation" in groups
        else "no central evaluation metrics (evaluate.global_evaluate)",
        "federated evaluation: the round's model on the datasites' own data, weighted by num_examples"
        if "federated evaluation" in groups
        else "no federated evaluation (job.fraction_evaluate)",
        "training: mean of the round's results, weighted by num_examples"
        if "training" in groups
        else "no train metrics reported",
    ]


def render_report(
    rows: list[RoundRow],
    out: Path,
    *,
    title: str,
    evaluations: dict[int, dict[str, float]] | None = None,
    force: bool = False,
) -> None:
    """Draw the curves, the participation bars and the per-datasite panel into the PNG at out."""
    plt = import_pyplot()
    from matplotlib.ticker import MaxNLocator

    evaluations = evaluations or {}
    # One panel per metric: metrics of one job differ in scale (a loss of 2.3 beside an
    # accuracy of 0.9), and a shared axis would flatten the smaller ones.
    groups = [
        ("evaluation", "tab:blue", _series([(row.round, row.evaluate) for row in rows])),
        ("federated evaluation", "darkcyan", _series(sorted(evaluations.items()))),
        ("training", "tab:purple", _series([(row.round, row.train) for row in rows])),
    ]
    drawn = [group for group in groups if group[2]]
    columns = max((_columns(len(series)) for _, _, series in drawn), default=1)
    # Each group starts a row of its own, so a metric measured two ways is not mistaken for one curve.
    placed: list[tuple[int, int, str, str, str, list[tuple[int, float]]]] = []
    curve_rows = 0  # 0 without metrics: the subtitle says so
    for group, color, series in drawn:
        for index, (name, points) in enumerate(series.items()):
            placed.append((curve_rows + index // columns, index % columns, group, color, name, points))
        curve_rows += -(-len(series) // columns)
    matrix = participation_matrix([(row.round, row.outcomes) for row in rows])
    heights = [2.6] * curve_rows + [3.25] + ([panel_height(matrix)] if matrix.datasites else [])
    legend = _legend({group for group, *_ in drawn})
    fig = plt.figure(figsize=(12, sum(heights) + 0.4 + 0.2 * len(legend)), layout="constrained")
    grid = fig.add_gridspec(len(heights), columns, height_ratios=heights)
    every_round = sorted({row.round for row in rows} | set(evaluations))
    x_min, x_max = every_round[0] - 0.6, every_round[-1] + 0.6

    def round_axis(ax: Any) -> None:
        ax.set_xlim(x_min, x_max)
        if len(every_round) <= 20:
            ax.set_xticks(every_round)  # MaxNLocator falls back to fractions for one or two rounds
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    for grid_row, column, group, color, name, points in placed:
        ax = fig.add_subplot(grid[grid_row, column])
        marker = "o" if len(points) <= 60 else None  # markers on long runs only blur the line
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, markersize=3.5, color=color)
        round_axis(ax)
        ax.grid(True, alpha=0.3)
        # One left-aligned title: a second, right-aligned one collides with long metric names.
        last = f", last {points[-1][1]:.4g}" if points else ""
        shown = name if len(name) <= 24 else name[:23] + "…"  # titles must not run into the next panel
        ax.set_title(f"{shown} ({group}{last})", fontsize=10, loc="left", color=color)

    rounds = [row.round for row in rows]
    bars = fig.add_subplot(grid[curve_rows, :])
    ok = [row.succeeded for row in rows]
    failed = [row.failed for row in rows]
    late = [row.timed_out for row in rows]
    colors, labels = ("tab:green", "tab:red", "tab:orange"), ("succeeded", "failed", "timed out")
    if len(rows) <= _MAX_BARS:
        bars.bar(rounds, ok, color=colors[0], label=labels[0])
        bars.bar(rounds, failed, bottom=ok, color=colors[1], label=labels[1])
        bottom = [a + b for a, b in zip(ok, failed, strict=True)]
        bars.bar(rounds, late, bottom=bottom, color=colors[2], label=labels[2])
    else:
        # Hundreds of one-pixel bars alias into stripes and take seconds to draw.
        bars.stackplot(rounds, ok, failed, late, colors=colors, labels=labels, step="mid")
    for row in rows if len(rows) <= _MAX_BARS else ():
        if row.attempt > 1:  # earlier attempts missed min_train_nodes; only the last one is in the file
            top = row.succeeded + row.failed + row.timed_out
            bars.annotate(
                f"attempt {row.attempt}",
                (row.round, top),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=7,
            )
    round_axis(bars)
    bars.set_ylim(0, max(a + b + c for a, b, c in zip(ok, failed, late, strict=True)) * 1.15 + 0.5)
    bars.yaxis.set_major_locator(MaxNLocator(integer=True))
    bars.set_ylabel("datasites")
    bars.set_title("participation per round", fontsize=10, loc="left")
    bars.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    bars.grid(True, axis="y", alpha=0.3)
    if matrix.datasites:
        heat = fig.add_subplot(grid[curve_rows + 1, :])
        draw_participation(heat, matrix)
        round_axis(heat)
    else:
        bars.set_xlabel("round")
    fig.suptitle(f"{title}\n" + "\n".join(legend), fontsize=10)
    png = io.BytesIO()
    try:
        fig.savefig(png, dpi=110, format="png")
    finally:
        plt.close(fig)
    _write_png(out, png.getvalue(), force=force)


def _exists(out: Path) -> ReportError:
    return ReportError(f"{out} exists; pass --force to overwrite it", EX_CANTCREAT)


def _write_png(out: Path, data: bytes, *, force: bool) -> None:
    try:
        if force:
            atomic_write(out, [data], durable=False)  # a viewer never sees half a PNG
        else:
            # O_EXCL: a file that appeared since make_report looked is not replaced either.
            write_durably(out, [data])
    except FileExistsError:
        raise _exists(out) from None
    except OSError as exc:
        raise ReportError(f"cannot write {out}: {exc.strerror or exc}", EX_CANTCREAT) from None


def make_report(state_dir: Path, out: Path, *, job: str, num_rounds: int, force: bool = False) -> str:
    """Write the report PNG for the job whose state is in state_dir; return a one-line summary.

    The summary starts with out, the file written. An existing out is replaced
    only with force; without it ReportError(73) names ``--force``.
    """
    import_pyplot()  # fail on a missing extra before reading anything
    if not force and (out.exists() or out.is_symlink()):
        raise _exists(out)
    rows = read_rounds(state_dir)
    evaluations = read_evaluations(state_dir)
    title = f"{job}: {len(rows)} of {num_rounds} rounds"
    render_report(rows, out, title=title, evaluations=evaluations, force=force)
    summary = f"{out}: rounds {rows[0].round}..{rows[-1].round}"
    if evaluations:
        summary += f", federated evaluations of {len(evaluations)} rounds"
    return summary
