"""A region's link to its root job: the root's rounds in, the region's partial aggregates out.

The region's runner in the root job (tiers/region.py) hands each root task to
``ask``. The root's model and config are kept durably as what round r
dispatches (``state_dir/region/models/`` and ``offer-NNNNN.json``); the
machine gets RootTask and opens round r when it is free. When round r is
aggregated, ``record`` writes the answer's num_examples and metrics
(``round-NNNNN.json``, naming the region's saved model and the root's model by
their sha256) before the checkpoint, and ``completed`` wakes ``ask``, which
returns the region's new model with them.

After kill -9 the root's task is still there and unanswered, so the runner
asks again: a round already aggregated is answered from those files, and a
round in progress is carried on by the daemon's own resume, with the root's
model and config restored from the offer files (``load_offer``).
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
    """The region is stopping; the runner's answer is cancelled with it, so nothing reaches the root."""


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
        # The root's model for each round, kept where a restart mid-round finds it again.
        self.offers = ModelStore(self.folder, store.job)
        self.clock = clock
        self.events: ObjectSendStream[ev.Event] | None = None
        self.ready = anyio.Event()
        self.stopping = False
        # The round the machine is at (set by the daemon): an older round that was never
        # answered will not be run any more.
        self.current_round: Callable[[], int] = lambda: 0
        self.reference: Mapping[str, np.ndarray] = {}
        self.offered: dict[int, tuple[Weights, dict[str, Any], str]] = {}
        self._waiting: dict[int, anyio.Event] = {}
        self._failed: dict[int, str] = {}
        self._completed: set[int] = set()

    def attach(self, events: ObjectSendStream[ev.Event], current_round: Callable[[], int]) -> None:
        """The daemon's event stream is open: root tasks can reach the machine now."""
        self.events = events
        self.current_round = current_round
        self.ready.set()

    def answer_path(self, rnd: int) -> Path:
        """Where round rnd's answer is recorded."""
        return self.folder / f"round-{rnd:05d}.json"

    def offer_path(self, rnd: int) -> Path:
        """Where the config the root sent for round rnd is kept (its model: ``offers``)."""
        return self.folder / f"offer-{rnd:05d}.json"

    async def ask(
        self, rnd: int, arrays: Weights, config: dict[str, Any], deadline: float | None
    ) -> RegionAnswer:
        """The root's task for round ``rnd``: this region's answer once the round is done.

        An answer is only ever given for the model the root sent: a record of round
        ``rnd`` made for another model (an earlier run of the root) is not reused.
        """
        root_sha256, _ = await anyio.to_thread.run_sync(self.offers.digest, rnd, arrays)
        answered = await anyio.to_thread.run_sync(self.answered, rnd, root_sha256)
        if answered is not None:
            log.info("region.answered_again", round=rnd, num_examples=answered.num_examples)
            return answered
        await self.ready.wait()
        if self.stopping:
            raise RegionStopping()
        done = self._waiting.setdefault(rnd, anyio.Event())
        # Registered first, then checked: a round completing in between is not missed.
        if rnd in self._failed or rnd in self._completed or rnd < self.current_round():
            return await self._settled(rnd, root_sha256)
        try:
            check_weights_match(arrays, model_spec(self.reference))
        except Exception as exc:
            raise RegionRoundFailed(f"the root's model does not fit this region's model: {exc}") from None
        await anyio.to_thread.run_sync(self._save_offer, rnd, arrays, config, root_sha256)
        assert self.events is not None
        seconds_left = None if deadline is None else round(deadline - self.clock(), 3)
        log.info("region.asked", round=rnd, deadline_in_seconds=seconds_left)
        await self.events.send(ev.RootTask(self.clock(), rnd, deadline))
        await done.wait()
        return await self._settled(rnd, root_sha256)

    async def _settled(self, rnd: int, root_sha256: str) -> RegionAnswer:
        """Round rnd is over for this region: its answer, or why there is none."""
        if rnd in self._failed:
            raise RegionRoundFailed(self._failed[rnd])
        answered = await anyio.to_thread.run_sync(self.answered, rnd, root_sha256)
        if answered is not None:
            return answered
        if self.stopping:
            raise RegionStopping()
        raise RegionRoundFailed(
            f"round {rnd} was not run for this model; this region is at round {self.current_round()}"
        )

    def _save_offer(self, rnd: int, arrays: Weights, config: dict[str, Any], root_sha256: str) -> None:
        """Keep the root's model and config for round rnd durably, before the round can use them."""
        for old in [r for r in self.offered if r < rnd - 1]:
            del self.offered[old]
        for old in [r for r in self.offers.rounds() if r < rnd - 1]:
            # A resume needs only the open round's offer: older ones would grow the state folder.
            self.offers.path_for(old).unlink(missing_ok=True)
            self.offer_path(old).unlink(missing_ok=True)
        self.offers.save(rnd, arrays)
        record = {"round": rnd, "config": config, "root_model_sha256": root_sha256}
        atomic_write_text(self.offer_path(rnd), json.dumps(record, sort_keys=True))
        self.offered[rnd] = (arrays, dict(config), root_sha256)

    def load_offer(self, rnd: int) -> None:
        """After a restart: what the root sent for round rnd, if it was kept."""
        try:
            record = json.loads(self.offer_path(rnd).read_text(encoding="utf-8"))
            arrays = self.offers.load_verified(rnd, record["root_model_sha256"])
            self.offered[rnd] = (arrays, dict(record["config"]), str(record["root_model_sha256"]))
        except (OSError, ValueError, KeyError, TypeError, ModelFileError):
            return

    def answered(self, rnd: int, root_sha256: str) -> RegionAnswer | None:
        """Round rnd's recorded answer, if this region finished that round for this root model."""
        try:
            record = json.loads(self.answer_path(rnd).read_text(encoding="utf-8"))
            if record["root_model_sha256"] != root_sha256:
                return None
            arrays = self.store.load_verified(rnd, record["model_sha256"])
        except (OSError, ValueError, KeyError, TypeError, ModelFileError):
            return None
        return RegionAnswer(arrays, int(record["num_examples"]), dict(record["metrics"]))

    def record(self, summary: ev.RoundSummary, model: Mapping[str, np.ndarray]) -> None:
        """Write the round's answer durably; its model file is already saved by the round."""
        offered = self.offered.get(summary.round)
        if offered is None:
            return  # not a round the root asked for (cannot happen while paced): nothing to answer
        sha256, _ = self.store.digest(summary.round, model)
        metrics = {**summary.train_metrics, **tier_counts(summary)}
        record = {
            "round": summary.round,
            "num_examples": summary.num_examples,
            "metrics": metrics,
            "model_sha256": sha256,
            "root_model_sha256": offered[2],
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.answer_path(summary.round), json.dumps(record, sort_keys=True))

    def completed(self, rnd: int) -> None:
        """Round rnd's answer is recorded: wake whoever asked for it."""
        self._completed.add(rnd)
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
