"""`fl-orchestrator report`: training curves and participation as one PNG.

Reads ``<state_dir>/metrics.jsonl`` (one line per completed round) and draws, per
round: each central evaluation metric, each train metric (the mean over the
round's results, weighted by num_examples), and who took part as stacked bars
(succeeded / failed / timed out). matplotlib is an optional extra; it is imported
only here, so the daemon and the other tools never need it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_orchestrator.daemon.reports import METRICS_FILE
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


def read_rounds(state_dir: Path) -> list[RoundRow]:
    """Parse metrics.jsonl into rows sorted by round (a torn or foreign line is skipped)."""
    path = state_dir / METRICS_FILE
    if not path.exists():
        raise ReportError(f"no metrics yet at {path}: has a round completed?", EX_NOINPUT)

    def torn(number: int, excerpt: str) -> None:
        print(f"warning: {path}:{number}: skipped a line that is not JSON: {excerpt!r}", file=sys.stderr)

    rows: dict[int, RoundRow] = {}
    try:
        for item in read_json_lines(path, on_torn=torn):
            try:
                rnd = int(item["round"])
                row = RoundRow(
                    round=rnd,
                    attempt=int(item.get("attempt") or 1),
                    succeeded=_size(item.get("succeeded")),
                    failed=_size(item.get("failed")),
                    timed_out=_size(item.get("timed_out")),
                    evaluate=_metrics(item.get("evaluate_metrics")),
                    train=_metrics(item.get("train_metrics")),
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a line this tool cannot read
            rows[rnd] = row
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror}", EX_NOINPUT) from None
    if not rows:
        raise ReportError(f"no completed rounds in {path}", EX_NOINPUT)
    return [rows[r] for r in sorted(rows)]


def _curve_names(rows: list[RoundRow], attr: str) -> list[str]:
    names: set[str] = set()
    for row in rows:
        names.update(getattr(row, attr))
    return sorted(names - _NOT_CURVES)[:_MAX_CURVES]


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


def render_report(rows: list[RoundRow], out: Path, *, title: str) -> None:
    """Draw the curves and the participation bars for rows into the PNG at out."""
    plt = import_pyplot()
    from matplotlib.ticker import MaxNLocator

    # One panel per metric: metrics of one job differ in scale (a loss of 2.3 beside an
    # accuracy of 0.9), and a shared axis would flatten the smaller ones.
    panels = [("evaluation", "evaluate", name, "tab:blue") for name in _curve_names(rows, "evaluate")]
    panels += [("training", "train", name, "tab:purple") for name in _curve_names(rows, "train")]
    columns = _columns(len(panels))
    curve_rows = -(-len(panels) // columns)  # 0 without metrics: the subtitle says so
    fig = plt.figure(figsize=(12, 2.6 * curve_rows + 3.4), layout="constrained")
    grid = fig.add_gridspec(curve_rows + 1, columns, height_ratios=[1.0] * curve_rows + [1.25])
    rounds = [row.round for row in rows]
    x_min, x_max = rounds[0] - 0.6, rounds[-1] + 0.6

    def round_axis(ax: Any) -> None:
        ax.set_xlim(x_min, x_max)
        if len(rounds) <= 20:
            ax.set_xticks(rounds)  # MaxNLocator falls back to fractions for one or two rounds
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    for index, (group, attr, name, color) in enumerate(panels):
        ax = fig.add_subplot(grid[index // columns, index % columns])
        points = [(row.round, getattr(row, attr)[name]) for row in rows if name in getattr(row, attr)]
        marker = "o" if len(points) <= 60 else None  # markers on long runs only blur the line
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, markersize=3.5, color=color)
        round_axis(ax)
        ax.grid(True, alpha=0.3)
        # One left-aligned title: a second, right-aligned one collides with long metric names.
        last = f", last {points[-1][1]:.4g}" if points else ""
        shown = name if len(name) <= 24 else name[:23] + "…"  # titles must not run into the next panel
        ax.set_title(f"{shown} ({group}{last})", fontsize=10, loc="left", color=color)

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
    bars.set_xlabel("round")
    bars.set_ylabel("datasites")
    bars.set_title("participation per round", fontsize=10, loc="left")
    bars.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    bars.grid(True, axis="y", alpha=0.3)
    groups = {group for group, *_ in panels}
    legend = [
        "evaluation: the global model on the central data after each round"
        if "evaluation" in groups
        else "no central evaluation metrics (evaluate.global_evaluate)",
        "training: mean of the round's results, weighted by num_examples"
        if "training" in groups
        else "no train metrics reported",
    ]
    fig.suptitle(f"{title}\n" + "; ".join(legend), fontsize=11)
    try:
        fig.savefig(out, dpi=110, format="png")
    except OSError as exc:
        raise ReportError(f"cannot write {out}: {exc.strerror or exc}", EX_CANTCREAT) from None
    finally:
        plt.close(fig)


def make_report(state_dir: Path, out: Path, *, job: str, num_rounds: int) -> str:
    """Write the report PNG for the job whose state is in state_dir; return a one-line summary."""
    import_pyplot()  # fail on a missing extra before reading anything
    rows = read_rounds(state_dir)
    title = f"{job}: {len(rows)} of {num_rounds} rounds"
    render_report(rows, out, title=title)
    return f"{out}: rounds {rows[0].round}..{rows[-1].round}"
