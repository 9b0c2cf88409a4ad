"""A region's link to its root job: the root's rounds in, the region's partial aggregates out.

The region's runner in the root job (tiers/region.py) hands each root task to
``ask``. The root's model and config are kept as what round r dispatches; the
machine gets RootTask and opens round r when it is free. Once round r is
aggregated and checkpointed, ``completed`` writes the answer's num_examples
and metrics durably beside the state (``state_dir/region/round-NNNNN.json``,
naming the saved model by its sha256) and wakes ``ask``, which returns the
region's new model with them.

After kill -9 the root's task is still there and unanswered, so the runner
asks again: a round already aggregated is answered from those files, and a
round in progress is carried on by the daemon's own resume.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import structlog
from anyio.abc import ObjectSendStream

from fl_orchestrator.core import events as ev
from fl_orchestrator.storage.atomic import atomic_write_text
from fl_orchestrator.storage.models import ModelFileError, ModelStore
from fl_orchestrator.wire.messages import check_weights_match, model_spec

log = structlog.get_logger("fl_orchestrator.region")

Weights = dict[str, np.ndarray]
Metrics = dict[str, int | float]

# The region's own accounting of each round, sent to the root with its answer.
TIER_PREFIX = "tier."


@dataclass(frozen=True)
class RegionAnswer:
    """What a region sends its root for one round: the weighted mean, its weight and metrics."""

    arrays: Weights
    num_examples: int
    metrics: Metrics


class RegionRoundFailed(Exception):
    """This region cannot answer the round: the root counts it as one failed datasite."""


class RegionStopping(Exception):
    """The region is stopping: the round is left for the restarted region to answer."""


def tier_counts(summary: ev.RoundSummary) -> Metrics:
    """The region's per-round accounting as metrics the root can show per region."""
    return {
        f"{TIER_PREFIX}selected": len(summary.selected),
        f"{TIER_PREFIX}succeeded": len(summary.succeeded),
        f"{TIER_PREFIX}failed": len(summary.failed),
        f"{TIER_PREFIX}timed_out": len(summary.timed_out),
    }


def regions_of(summary: ev.RoundSummary) -> dict[str, Metrics]:
    """A root's round: each answering region's own counts (the tier.* metrics it sent)."""
    return {
        region: {k[len(TIER_PREFIX) :]: v for k, v in metrics.items() if k.startswith(TIER_PREFIX)}
        for region, metrics in summary.metrics_by_datasite.items()
        if any(k.startswith(TIER_PREFIX) for k in metrics)
    }


def sum_tier_counts(summary: ev.RoundSummary) -> ev.RoundSummary:
    """A root's round metrics: the regions' counts added up, not averaged by num_examples."""
    regions = regions_of(summary)
    if not regions:
        return summary
    merged: Metrics = {k: v for k, v in summary.train_metrics.items() if not k.startswith(TIER_PREFIX)}
    for counts in regions.values():
        for key, value in counts.items():
            merged[TIER_PREFIX + key] = merged.get(TIER_PREFIX + key, 0) + int(value)
    return dataclasses.replace(summary, train_metrics=merged)


class RootLink:
    """The daemon's side of being a region; see the module docstring."""

    def __init__(self, state_dir: Path, store: ModelStore, clock: Callable[[], float]) -> None:
        self.folder = state_dir / "region"
        self.store = store
        self.clock = clock
        self.events: ObjectSendStream[ev.Event] | None = None
        self.ready = anyio.Event()
        self.stopping = False
        # The round the machine is at (set by the daemon): an older round that was never
        # answered will not be run any more.
        self.current_round: Callable[[], int] = lambda: 0
        self.reference: Mapping[str, np.ndarray] = {}
        self.offered: dict[int, tuple[Weights, dict[str, Any]]] = {}
        self._waiting: dict[int, anyio.Event] = {}
        self._failed: dict[int, str] = {}

    def attach(self, events: ObjectSendStream[ev.Event], current_round: Callable[[], int]) -> None:
        """The daemon's event stream is open: root tasks can reach the machine now."""
        self.events = events
        self.current_round = current_round
        self.ready.set()

    def answer_path(self, rnd: int) -> Path:
        """Where round rnd's answer is recorded."""
        return self.folder / f"round-{rnd:05d}.json"

    async def ask(
        self, rnd: int, arrays: Weights, config: dict[str, Any], deadline: float | None
    ) -> RegionAnswer:
        """The root's task for round ``rnd``: this region's answer once the round is done."""
        answered = await anyio.to_thread.run_sync(self.answered, rnd)
        if answered is not None:
            log.info("region.answered_again", round=rnd, num_examples=answered.num_examples)
            return answered
        await self.ready.wait()
        if self.stopping:
            raise RegionStopping()
        if rnd < self.current_round():
            left = f"round {rnd} was left unfinished; this region is at round {self.current_round()}"
            raise RegionRoundFailed(self._failed.get(rnd, left))
        try:
            check_weights_match(arrays, model_spec(self.reference))
        except Exception as exc:
            raise RegionRoundFailed(f"the root's model does not fit this region's model: {exc}") from None
        for old in [r for r in self.offered if r < rnd - 1]:
            del self.offered[old]
        self.offered[rnd] = (arrays, dict(config))
        done = self._waiting.setdefault(rnd, anyio.Event())
        assert self.events is not None
        seconds_left = None if deadline is None else round(deadline - self.clock(), 3)
        log.info("region.asked", round=rnd, deadline_in_seconds=seconds_left)
        await self.events.send(ev.RootTask(self.clock(), rnd, deadline))
        await done.wait()
        if rnd in self._failed:
            raise RegionRoundFailed(self._failed[rnd])
        answered = await anyio.to_thread.run_sync(self.answered, rnd)
        if answered is None:
            raise RegionStopping()
        return answered

    def answered(self, rnd: int) -> RegionAnswer | None:
        """Round rnd's recorded answer, if this region finished that round."""
        try:
            record = json.loads(self.answer_path(rnd).read_text(encoding="utf-8"))
            arrays = self.store.load_verified(rnd, record["model_sha256"])
        except (OSError, ValueError, KeyError, TypeError, ModelFileError):
            return None
        return RegionAnswer(arrays, int(record["num_examples"]), dict(record["metrics"]))

    def record(self, summary: ev.RoundSummary, model: Mapping[str, np.ndarray]) -> None:
        """Write round's answer durably (after the checkpoint: the model file is already saved)."""
        sha256, _ = self.store.digest(summary.round, model)
        metrics = {**summary.train_metrics, **tier_counts(summary)}
        record = {
            "round": summary.round,
            "num_examples": summary.num_examples,
            "metrics": metrics,
            "model_sha256": sha256,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.answer_path(summary.round), json.dumps(record, sort_keys=True))

    def completed(self, rnd: int) -> None:
        """Round rnd's answer is recorded: wake whoever asked for it."""
        self._waiting.pop(rnd, anyio.Event()).set()

    def failed(self, rnd: int, reason: str) -> None:
        """Round rnd cannot be answered: the root is told so."""
        self._failed[rnd] = reason
        self._waiting.pop(rnd, anyio.Event()).set()

    def stop(self) -> None:
        """The region is stopping: every pending ask returns without an answer."""
        self.stopping = True
        for event in self._waiting.values():
            event.set()
        self._waiting.clear()

    async def root_ended(self) -> None:
        """The root job has ended: the region finishes too."""
        await self.ready.wait()
        assert self.events is not None
        await self.events.send(ev.RootEnded(self.clock()))
