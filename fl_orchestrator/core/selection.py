"""Seeded choice of who trains a round, and deterministic task ids."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable


def sample_size(num_available: int, fraction: float, minimum: int) -> int:
    """How many to select: Flower's max(int(n * fraction), minimum), capped at n."""
    return min(num_available, max(int(num_available * fraction), minimum))


def select_datasites(
    available: Iterable[str], *, fraction: float, minimum: int, seed: int, rnd: int, attempt: int
) -> tuple[str, ...]:
    """Pick this round's datasites; the same inputs always give the same choice."""
    pool = sorted(available)
    count = sample_size(len(pool), fraction, minimum)
    digest = hashlib.sha256(f"{seed}|{rnd}|{attempt}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return tuple(sorted(rng.sample(pool, count)))


def task_id(run_id: str, rnd: int, attempt: int, datasite: str) -> str:
    """A task's message id, stable across restarts of the same run."""
    return hashlib.sha256(f"{run_id}|{rnd}|{attempt}|{datasite}".encode()).hexdigest()[:32]
