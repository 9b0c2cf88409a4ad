"""Combining the metrics datasites report."""

from __future__ import annotations

from fl_orchestrator.core.events import Metrics


def weighted_metrics(metrics: dict[str, Metrics], weights: dict[str, int]) -> Metrics:
    """Mean of each numeric metric, weighted by num_examples, over the datasites that sent it."""
    sums: dict[str, float] = {}
    totals: dict[str, int] = {}
    for datasite, values in metrics.items():
        weight = weights.get(datasite, 0)
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + weight * float(value)
            totals[key] = totals.get(key, 0) + weight
    return {k: sums[k] / totals[k] for k in sorted(sums) if totals[k] > 0}
