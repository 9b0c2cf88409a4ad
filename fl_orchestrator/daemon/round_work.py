"""The heavy half of each round: broadcast, fold, aggregate, evaluate.

Everything numpy-heavy or file-heavy runs in a worker thread so that file
intake and timers keep turning while a model is folded or written.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import structlog

from fl_orchestrator.aggregation.base import RoundSkipped, Strategy
from fl_orchestrator.aggregation.clipping import ClippedUpdate, clip_factor, update_norm
from fl_orchestrator.aggregation.guard import finish_finite
from fl_orchestrator.aggregation.weights import as_num_examples, capped_weights
from fl_orchestrator.config.loader import ConfigError, check_config_value
from fl_orchestrator.config.schema import JobConfig
from fl_orchestrator.core import events as ev
from fl_orchestrator.core.reasons import Reason
from fl_orchestrator.intake.adapter import WireAdapter
from fl_orchestrator.intake.reader import ResultHandle
from fl_orchestrator.intake.result_files import FileUpdate, ResultGone
from fl_orchestrator.protocols.contract import Broadcast, Publisher
from fl_orchestrator.storage import failpoints
from fl_orchestrator.storage.kept import KeptResults
from fl_orchestrator.storage.models import ModelStore
from fl_orchestrator.storage.retry import WriteRetry
from fl_orchestrator.wire.messages import split_runner_seconds

log = structlog.get_logger("fl_orchestrator.rounds")

Evaluate = Callable[[dict[str, np.ndarray]], dict[str, float]]


class HookFailed(Exception):
    """A user hook (configure_round, metrics_aggregation) raised or returned something unusable."""


ConfigureRound = Callable[[int, dict[str, Any]], Any]
MetricsAggregation = Callable[[list[tuple[int, dict[str, float]]]], Any]


class RoundWork:
    """Carries out Dispatch, Accept and Aggregate for the daemon."""

    def __init__(
        self,
        config: JobConfig,
        *,
        publisher: Publisher,
        wire: WireAdapter,
        store: ModelStore,
        strategy: Strategy,
        evaluate: Evaluate | None,
        clock: Callable[[], float],
        retry: WriteRetry,
        kept: KeptResults,
        configure_round: ConfigureRound | None = None,
        metrics_aggregation: MetricsAggregation | None = None,
    ) -> None:
        self.config = config
        self.retry = retry
        self.kept = kept
        # With a cap on one datasite's share the weights are known only at the round's end:
        # results are then folded from their files there, like a whole-set strategy's.
        self.deferred = config.limits.max_weight_share > 0
        self.publisher = publisher
        self.wire = wire
        self.store = store
        self.strategy = strategy
        self.evaluate_hook = evaluate
        self.configure_round_hook = configure_round
        self.metrics_hook = metrics_aggregation
        self.clock = clock
        # What configure_round sees: the last completed round's metrics.
        self.previous_metrics: dict[str, Any] = {}
        self.global_model: dict[str, np.ndarray] = {}
        self.broadcast: Broadcast | None = None
        self.last_evaluate: dict[str, float] = {}
        # Models and tasks this process published (the metrics file's bytes counter).
        self.bytes_written_total = 0
        # Whole-set strategies: accepted results stay on disk until the round closes.
        self.accepted_files: list[tuple[str, ResultHandle, int]] = []
        # A region's round: the config its root sent, over this job's own (docs/TIERS.md).
        self.root_config: dict[str, Any] | None = None

    async def dispatch(self, action: ev.Dispatch, *, begin: bool = True) -> None:
        """Write the round's model (once) and its tasks; start a fresh aggregate if ``begin``."""
        started = time.perf_counter()
        # An evaluation scores the round's new aggregate: the model round+1 will train.
        model_round = action.round + 1 if action.purpose == "evaluate" else action.round
        if self.broadcast is None or self.broadcast.round != model_round:
            model = self.global_model
            # The state folder saved this model as the round before: the broadcast may link it.
            self.broadcast = await self.retry.run(
                lambda: self.publisher.write_model(
                    model_round, model, self.store.saved(model_round - 1, model)
                ),
                what="model for the datasites",
                path=self.publisher.models_dir,
            )
            self.bytes_written_total += 0 if self.broadcast.linked else self.broadcast.nbytes
        failpoints.hit("dispatch.after_model")
        if begin and action.purpose == "train":
            self.strategy.begin_round(action.round, self.global_model)
            self.accepted_files = []
        # An evaluation sends the static config only: configure_round is about training.
        config = self.round_config(action.round, hooks=action.purpose == "train")
        broadcast = self.broadcast
        task_bytes = await self.retry.run(
            lambda: self.publisher.write_tasks(
                broadcast,
                action.tasks,
                attempt=action.attempt,
                deadline=action.deadline,
                config=config,
                action=action.purpose,
                rnd=action.round,
            ),
            what="tasks",
            path=self.publisher.tasks_dir,
        )
        failpoints.hit("dispatch.after_tasks")
        self.bytes_written_total += task_bytes
        log.info(
            "round.dispatched",
            round=action.round,
            attempt=action.attempt,
            phase=action.purpose,
            selected=sorted(action.tasks),
            model=broadcast.ref.path,
            model_bytes=broadcast.nbytes,
            task_bytes=task_bytes,
            deadline_in_seconds=round(action.deadline - self.clock(), 3),
            dispatch_seconds=round(time.perf_counter() - started, 6),
        )

    def round_config(self, rnd: int, *, hooks: bool = True) -> dict[str, Any]:
        """Static train_config, then the strategy's, then configure_round's, then server-round."""
        config: dict[str, Any] = dict(self.config.job.train_config)
        config.update(self.strategy.round_config(rnd))
        if hooks and self.configure_round_hook is not None:
            try:
                extra = self.configure_round_hook(rnd, dict(self.previous_metrics))
                if not isinstance(extra, dict):
                    raise TypeError(f"returned {type(extra).__name__}, not a dict")
                for key, value in extra.items():
                    if not isinstance(key, str) or key == "server-round":
                        raise TypeError(f"key {key!r} cannot be set")
                    check_config_value(value, f"configure_round[{key!r}]")
            except (Exception, ConfigError) as exc:
                raise HookFailed(
                    f"job.configure_round failed for round {rnd}: {type(exc).__name__}: {exc}"
                ) from exc
            config.update(extra)
        if self.root_config is not None:
            config.update(self.root_config)
        config["server-round"] = rnd
        return config

    def aggregate_metrics(self, summary: ev.RoundSummary) -> ev.RoundSummary:
        """Apply job.metrics_aggregation, if set, to the round's per-datasite train metrics."""
        if self.metrics_hook is None:
            return summary
        pairs = [
            (summary.examples_by_datasite[d], {k: float(v) for k, v in m.items()})
            for d, m in summary.metrics_by_datasite.items()
        ]
        try:
            merged = {str(k): float(v) for k, v in dict(self.metrics_hook(pairs)).items()}
        except Exception as exc:  # user code: keep the default aggregate, say why
            log.error(
                "metrics_aggregation.failed",
                round=summary.round,
                error=f"{type(exc).__name__}: {exc}",
            )
            return summary
        return dataclasses.replace(summary, train_metrics=merged)

    async def fold(self, action: ev.Accept) -> None:
        """Fold one accepted result and keep its file (as the protocol says) for a restart.

        Whole-set strategies only note the file: they read it at the round's end.
        """
        handle: ResultHandle = action.payload
        started = time.perf_counter()
        fold_seconds = None
        await self.retry.run(
            lambda: self.wire.keep(self.kept, action.round, handle),
            what="kept result",
            path=self.kept.path_for(action.round, handle.path),
        )
        message = handle.message
        if self.strategy.streaming and not self.deferred:
            assert message is not None, "a replayed result is read again before it is folded"
            with anyio.fail_after(self.config.daemon.aggregation_timeout_seconds):
                # Abandoned on shutdown: the fold is in memory only, the round log has the result.
                await anyio.to_thread.run_sync(
                    self.strategy.fold, message.arrays, action.num_examples, abandon_on_cancel=True
                )
            failpoints.hit("fold.after")
            fold_seconds = round(time.perf_counter() - started, 6)
        else:
            self.accepted_files.append((action.datasite, handle, action.num_examples))
        metrics, runner_seconds = split_runner_seconds(message.metrics) if message else (None, None)
        if message is not None:
            # Folded, or read again from its file at the round's end: the decoded arrays go now.
            # Held until the round loop let the event go, a whole-set strategy's handles kept
            # every decoded result of the round (747 MiB at N = 16 x 38 MiB, bench/README.md).
            message.arrays.clear()
        log.info(
            "result.accepted",
            round=action.round,
            datasite=action.datasite,
            num_examples=action.num_examples,
            metrics=metrics,
            train_seconds=runner_seconds,
            path=str(handle.path),
            fold_seconds=fold_seconds,
        )

    async def aggregate(self, summary: ev.RoundSummary) -> tuple[Path, float]:
        """Finish the aggregate and save the model; return its path and the seconds it took."""
        started = time.perf_counter()
        failpoints.hit("aggregate.before_finish")
        with anyio.fail_after(self.config.daemon.aggregation_timeout_seconds):
            new_model = await anyio.to_thread.run_sync(self._finish, summary.round, abandon_on_cancel=True)
        path = await self.retry.run(
            lambda: self.store.save(summary.round, new_model),
            what="global model",
            path=self.store.path_for(summary.round),
        )
        failpoints.hit("aggregate.after_model_saved")
        self.global_model = new_model
        return path, time.perf_counter() - started

    def _finish(self, rnd: int) -> dict[str, np.ndarray]:
        """The next global model; the current one if the strategy skips the round."""
        files: list[FileUpdate] = []
        try:
            if not self.strategy.streaming or self.deferred:
                updates: list[Mapping[str, np.ndarray]] = []
                weights: list[int] = []
                # By datasite, not arrival: ties in a selection (Krum) and the order of
                # float sums must not depend on which datasite uploaded first.
                for _, handle, num_examples in sorted(self.accepted_files, key=lambda item: item[0]):
                    update = self._open_counted(rnd, handle)
                    if update is not None:
                        files.append(update)
                        updates.append(self._bounded(update))
                        weights.append(num_examples)
                share = self.config.limits.max_weight_share
                if share > 0:
                    weights = as_num_examples(capped_weights(weights, share))
                self.strategy.aggregate_all(updates, weights)
            return finish_finite(self.strategy)
        except RoundSkipped as exc:
            log.warning("round.skipped", round=rnd, reason=str(exc), model="unchanged")
            return self.global_model
        finally:
            for update in files:
                update.close()
            self.accepted_files = []

    def _open_counted(self, rnd: int, handle: ResultHandle) -> FileUpdate | None:
        """The counted file, from its kept copy if there is one; None (logged) if it changed.

        The kept copy is ours and its bytes are checked against the sha256
        validated; the datasite's own file must also still be the same file.
        """
        kept = self.kept.path_for(rnd, handle.path)
        try:
            if os.path.lexists(kept):
                # Our own copy: its sha256 says all (logs older than the sha256 have only the identity).
                return FileUpdate(kept, None if handle.sha256 else handle.identity, handle.sha256)
            return FileUpdate(handle.path, handle.identity, handle.sha256)
        except (ResultGone, OSError) as exc:
            log.error(
                "result.dropped",
                round=rnd,
                path=str(handle.path),
                reason=str(Reason.CHANGED_AFTER_COUNT),
                detail=str(exc),
            )
            return None

    def _bounded(self, update: FileUpdate) -> Mapping[str, np.ndarray]:
        """In clip mode, clip a re-read result the way the intake clipped it when it arrived."""
        limits = self.config.limits
        if limits.max_update_norm <= 0 or limits.update_norm_action != "clip":
            return update  # anything over the bound was refused on arrival
        norm = update_norm(update, self.global_model)
        if norm <= limits.max_update_norm or not math.isfinite(norm):
            return update
        return ClippedUpdate(update, self.global_model, clip_factor(norm, limits.max_update_norm))

    async def evaluate(self, rnd: int) -> dict[str, float]:
        """Central evaluation of the current global model, bounded by its timeout."""
        if self.evaluate_hook is None:
            return {}
        with anyio.move_on_after(self.config.evaluate.timeout_seconds) as scope:
            self.last_evaluate = await anyio.to_thread.run_sync(
                self.evaluate_sync, rnd, abandon_on_cancel=True
            )
        if scope.cancelled_caught:
            log.error(
                "evaluate.timeout",
                round=rnd,
                timeout_seconds=self.config.evaluate.timeout_seconds,
            )
            return {}
        return self.last_evaluate

    def evaluate_sync(self, rnd: int) -> dict[str, float]:
        """Run the user's global_evaluate; a failure is logged, not fatal."""
        if self.evaluate_hook is None:
            return {}
        started = time.perf_counter()
        try:
            raw = self.evaluate_hook({k: v.copy() for k, v in self.global_model.items()})
            metrics = {str(k): float(v) for k, v in dict(raw).items()}
        except Exception as exc:  # user code
            log.error("evaluate.failed", round=rnd, error=f"{type(exc).__name__}: {exc}")
            return {}
        log.info(
            "evaluate.done",
            round=rnd,
            phase="evaluate",
            metrics=metrics,
            evaluate_seconds=round(time.perf_counter() - started, 6),
        )
        self.last_evaluate = metrics
        return metrics
