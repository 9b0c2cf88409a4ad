"""The outlier rule: an update far larger than the federation's usual update is refused.

The reference is the median of each datasite's update norm in the last round
it was aggregated in: a value from rounds already closed, fixed for the whole
round, so the decision does not depend on the order results arrive in (nor
on a restart). It needs at least ``MIN_REFERENCE_NORMS`` datasites' norms;
before that (round 1, or fewer datasites) the rule does not apply.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from fl_orchestrator.core.records import DatasiteRecord

MIN_REFERENCE_NORMS = 3


def reference_norm(records: Iterable[DatasiteRecord]) -> float | None:
    """The median of the datasites' last aggregated update norms, or None with too few of them."""
    norms = [r.last_update_norm for r in records if r.last_update_norm is not None]
    if len(norms) < MIN_REFERENCE_NORMS:
        return None
    return float(statistics.median(norms))


def outlier_detail(norm: float | None, reference: float | None, factor: float) -> str | None:
    """Why an update of ``norm`` is an outlier against ``reference`` (None: it is not, or no rule)."""
    if factor <= 0 or norm is None or reference is None or reference <= 0:
        return None
    if norm <= factor * reference:
        return None
    return (
        f"update norm {norm:.6g} is over {factor:g} x the median of the last rounds'"
        f" update norms ({reference:.6g})"
    )
