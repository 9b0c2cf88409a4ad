"""Whether a decoded training result counts in the open round, or why not.

Pure: the machine passes in what it knows (its round, phase, open attempt and
the sender's record), and gets back None or a reason code with its detail.
"""

from __future__ import annotations

from fl_orchestrator.core.events import ResultReceived
from fl_orchestrator.core.outliers import outlier_detail
from fl_orchestrator.core.reasons import Reason
from fl_orchestrator.core.records import Attempt, Phase, RoundRules

# Phases in which the open round has stopped taking results.
_CLOSED_PHASES = (Phase.AGGREGATING, Phase.EVALUATING, Phase.DONE)


def check_result(
    event: ResultReceived,
    *,
    rnd: int,
    phase: Phase,
    current: Attempt | None,
    rules: RoundRules,
    first_num_examples: int | None,
    reference_norm: float | None,
) -> tuple[Reason, str] | None:
    """None if ``event`` counts in the open attempt of round ``rnd``, else the reason it is refused."""
    if event.round < rnd or (event.round == rnd and phase in _CLOSED_PHASES):
        return Reason.ROUND_CLOSED, f"round {event.round} is closed (now at {rnd})"
    if event.round > rnd or current is None or phase != Phase.TRAINING:
        return Reason.UNKNOWN_ROUND, f"round {event.round} is not open (phase {phase})"
    expected = current.tasks.get(event.datasite)
    if expected is None:
        return Reason.NOT_SELECTED, f"not selected in round {rnd} attempt {current.attempt}"
    if event.reply_to != expected:
        return Reason.REPLY_TO_MISMATCH, f"reply_to {event.reply_to!r} is not this attempt's task"
    if current.has_answered(event.datasite):
        return Reason.DUPLICATE, f"already answered round {rnd}"
    first = first_num_examples
    growth = rules.max_num_examples_growth
    if event.ok and growth > 0 and first is not None and event.num_examples > growth * first:
        return Reason.NUM_EXAMPLES_JUMP, (
            f"claims {event.num_examples} examples, over {growth:g} x its first claim of {first}"
        )
    outlier = outlier_detail(event.update_norm, reference_norm, rules.outlier_norm_factor)
    if event.ok and outlier is not None:
        return Reason.NORM_OUTLIER, outlier
    return None
