"""Who took part in which round: the datasites × rounds panel of `fl-orchestrator report`.

Built from metrics.jsonl's per-round ``selected``, ``succeeded``, ``failed``
(datasite -> error type) and ``timed_out``. A round's line holds only its last
attempt, so a datasite selected in an abandoned earlier attempt shows as not
selected there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NOT_SELECTED, SUCCEEDED, FAILED, TIMED_OUT = 0, 1, 2, 3
NO_RECORD = -1  # a round between the first and the last without a metrics line: drawn blank
LABELS = {SUCCEEDED: "succeeded", FAILED: "failed", TIMED_OUT: "timed out", NOT_SELECTED: "not selected"}
COLORS = {SUCCEEDED: "tab:green", FAILED: "tab:red", TIMED_OUT: "tab:orange", NOT_SELECTED: "#e6e6e6"}
# 60 rows of labels still fit a page; 1,000 datasites would make the figure metres tall.
MAX_DATASITES = 60


def _names(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [str(name) for name in value]
    return [str(name) for name in value] if isinstance(value, list) else []


def outcomes_of(line: Mapping[str, Any]) -> dict[str, int]:
    """Datasite -> outcome code (SUCCEEDED, FAILED, TIMED_OUT) of one metrics.jsonl line."""
    # A selected datasite in none of the lists had no result when the round closed.
    outcomes = dict.fromkeys(_names(line.get("selected")), TIMED_OUT)
    outcomes.update(dict.fromkeys(_names(line.get("timed_out")), TIMED_OUT))
    outcomes.update(dict.fromkeys(_names(line.get("failed")), FAILED))
    outcomes.update(dict.fromkeys(_names(line.get("succeeded")), SUCCEEDED))
    return outcomes


@dataclass(frozen=True)
class ParticipationMatrix:
    """``cells[i][j]``: the outcome of ``datasites[i]`` in ``rounds[j]``."""

    rounds: list[int]
    datasites: list[str]
    cells: list[list[int]]
    left_out: int  # datasites not drawn, beyond max_datasites


def participation_matrix(
    rounds: Sequence[tuple[int, Mapping[str, int]]], *, max_datasites: int = MAX_DATASITES
) -> ParticipationMatrix:
    """The matrix for (round, outcomes_of(line)) pairs; a later pair for a round replaces an earlier one.

    Over max_datasites, those kept are the ones with the most failures and
    timeouts (then the most often selected): the rows an operator looks for.
    Rows are in name order, columns every round from the first to the last.
    """
    by_round = dict(rounds)
    if not by_round:
        return ParticipationMatrix([], [], [], 0)
    selected: Counter[str] = Counter()
    trouble: Counter[str] = Counter()
    for outcomes in by_round.values():
        for name, code in outcomes.items():
            selected[name] += 1
            trouble[name] += int(code in (FAILED, TIMED_OUT))
    ranked = sorted(selected, key=lambda name: (-trouble[name], -selected[name], name))
    kept = sorted(ranked[: max(max_datasites, 0)])
    columns = list(range(min(by_round), max(by_round) + 1))
    cells = [
        [by_round[rnd].get(name, NOT_SELECTED) if rnd in by_round else NO_RECORD for rnd in columns]
        for name in kept
    ]
    return ParticipationMatrix(columns, kept, cells, len(ranked) - len(kept))


def panel_height(matrix: ParticipationMatrix) -> float:
    """Inches the panel needs: a label row per datasite, plus axis and title."""
    return 1.1 + 0.16 * len(matrix.datasites)


def draw_participation(ax: Any, matrix: ParticipationMatrix) -> None:
    """Draw the matrix into a matplotlib Axes (x: round, y: datasite); the caller sets the x limits."""
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    codes = (NOT_SELECTED, SUCCEEDED, FAILED, TIMED_OUT)
    cmap = ListedColormap([COLORS[code] for code in codes]).with_extremes(bad="white")
    data = np.ma.masked_less(np.array(matrix.cells, dtype=float), 0)
    first, last, rows = matrix.rounds[0], matrix.rounds[-1], len(matrix.datasites)
    ax.imshow(
        data,
        cmap=cmap,
        norm=BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], cmap.N),
        aspect="auto",
        interpolation="nearest",  # cells, not a smoothed picture
        extent=(first - 0.5, last + 0.5, rows - 0.5, -0.5),
    )
    ax.set_yticks(range(rows))
    labels = [name if len(name) <= 32 else name[:31] + "…" for name in matrix.datasites]
    ax.set_yticklabels(labels, fontsize=7 if rows <= 30 else 6)
    ax.set_xlabel("round")
    title = "participation per datasite"
    if matrix.left_out:
        shown = len(matrix.datasites)
        title += (
            f": {shown} of {shown + matrix.left_out} shown, those with the most failures and"
            f" timeouts ({matrix.left_out} left out)"
        )
    ax.set_title(title, fontsize=10, loc="left")
    handles = [Patch(color=COLORS[code], label=LABELS[code]) for code in (*codes[1:], NOT_SELECTED)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
