"""One datasite's share of a round's weight, capped: ``limits.max_weight_share``.

FedAvg weighs each result by the num_examples its datasite claims, so a
datasite that claims enough owns the aggregate. With a share s, the weights
w_i become w'_i = min(w_i, c), with the cap c chosen so that the largest
capped weight is exactly s of the capped total:

    c = s · Σ_i min(w_i, c)

The excess of the capped datasites is spread over the others in proportion to
their own weights (their ratios are unchanged). When s · n ≤ 1, no cap can
satisfy this (n results cannot each have at most s of the total unless
s ≥ 1/n), and every result gets the same weight.
"""

from __future__ import annotations

from collections.abc import Sequence

# Capped weights are handed to strategies as integers (num_examples): the largest
# becomes 2**40, so the relative rounding error of any weight is below 1e-12.
_INTEGER_SCALE = float(2**40)


def capped_weights(weights: Sequence[float], share: float) -> list[float]:
    """The weights with no one over ``share`` of the total (see the module docstring)."""
    n = len(weights)
    if n == 0 or share <= 0 or share >= 1:
        return [float(w) for w in weights]
    total = float(sum(weights))
    if total <= 0 or max(weights) <= share * total:
        return [float(w) for w in weights]
    if share * n <= 1:
        return [1.0] * n
    ordered = sorted(weights, reverse=True)
    # rest[k]: what the others weigh when the k largest are capped, summed from the small
    # end (subtracting a huge claim from the total would lose the small ones' digits).
    rest = [0.0] * (n + 1)
    for index in range(n - 1, -1, -1):
        rest[index] = rest[index + 1] + float(ordered[index])
    for k in range(1, n):
        cap = share * rest[k] / (1 - share * k)
        if ordered[k] <= cap <= ordered[k - 1]:
            return [min(float(w), cap) for w in weights]
    return [1.0] * n


def as_num_examples(weights: Sequence[float]) -> list[int]:
    """Positive integers in the same ratios, for strategies that take num_examples."""
    top = max(weights, default=0.0)
    if top <= 0:
        return [0 for _ in weights]
    return [max(1, round(w / top * _INTEGER_SCALE)) if w > 0 else 0 for w in weights]
