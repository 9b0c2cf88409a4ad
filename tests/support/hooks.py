"""User hooks named by import strings in test job files."""

from __future__ import annotations

from typing import Any

SEEN: list[tuple[int, dict[str, Any]]] = []


def decaying_lr(rnd: int, previous: dict[str, Any]) -> dict[str, Any]:
    """A learning-rate schedule that also records what it was given."""
    SEEN.append((rnd, previous))
    return {"lr": 1.0 / rnd, "previous_loss": float(previous.get("train", {}).get("loss", -1.0))}


def bad_schedule(rnd: int, previous: dict[str, Any]) -> dict[str, Any]:
    """Returns a value that cannot be sent to datasites."""
    return {"nested": {"not": "allowed"}}


def largest_loss(pairs: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """A custom metrics aggregation: the worst loss and how many reported."""
    return {"max_loss": max(m["loss"] for _, m in pairs), "reporters": float(len(pairs))}
