"""Checkpoints: everything needed to resume after the last completed round.

A checkpoint file is ``MAGIC + sha256(body) + body`` where the body is a
message stream (header map, then one bin per array) holding the strategy's
state, the per-datasite accounting and the global model. The model is named,
not copied, when the round's model file (storage/models.py, written just
before) is there: the header holds its sha256, and loading checks the file
against it, so the model is written once a round instead of twice. A
checkpoint whose model file is gone or changed is unusable like a corrupt one.
It is written atomically and durably; on load a bad magic, a bad checksum, a
truncated file or a changed model file is reported loudly and the previous
checkpoint is used instead. Files of version 1 (the model inside) still load.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from fl_orchestrator.core.reasons import Rejection
from fl_orchestrator.storage import failpoints
from fl_orchestrator.storage.atomic import atomic_write
from fl_orchestrator.storage.models import ModelFileError, ModelStore
from fl_orchestrator.wire.frames import FrameLimits, decode_arrays, decode_header, encode_frames

log = structlog.get_logger("fl_orchestrator.checkpoints")

MAGIC = b"FLCKPT1\n"
_NAME = re.compile(r"^ckpt-r(\d{5})\.bin$")
_LIMITS = FrameLimits(max_header_bytes=64 * 1024 * 1024, max_arrays=1 << 20, max_elements=2**34)
_ARRAY_REF = "__array__"
_BIG_INT = "__bigint__"  # msgpack ints stop at 64 bits; RNG states (PCG64) use 128


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why."""


@dataclass(frozen=True)
class Checkpoint:
    """The state after a completed round (round 0 = the initial model)."""

    round: int
    run_id: str
    model: dict[str, np.ndarray]
    strategy_state: dict[str, Any]
    records: dict[str, dict[str, Any]]


def _flatten(state: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Replace arrays inside a nested state by references, collecting them."""
    if isinstance(state, np.ndarray):
        key = f"strategy/{len(arrays)}"
        arrays[key] = state
        return {_ARRAY_REF: key}
    if isinstance(state, np.generic):
        return _flatten(state.item(), arrays)
    if isinstance(state, int) and not isinstance(state, bool) and not -(2**63) <= state < 2**64:
        return {_BIG_INT: str(state)}
    if isinstance(state, dict):
        return {str(k): _flatten(v, arrays) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_flatten(v, arrays) for v in state]
    return state


def _unflatten(state: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(state, dict):
        if set(state) == {_ARRAY_REF}:
            return np.array(arrays[state[_ARRAY_REF]])
        if set(state) == {_BIG_INT}:
            return int(state[_BIG_INT])
        return {k: _unflatten(v, arrays) for k, v in state.items()}
    if isinstance(state, list):
        return [_unflatten(v, arrays) for v in state]
    return state


class CheckpointStore:
    """state_dir/checkpoints/ckpt-rNNNNN.bin, keeping the newest ``keep``."""

    def __init__(self, state_dir: Path, job: str, keep: int, models: ModelStore | None = None) -> None:
        self.directory = state_dir / "checkpoints"
        self.job = job
        self.keep = keep
        # The daemon passes the store that saved the round's model: naming it costs no second hash.
        self.models = models or ModelStore(state_dir, job)

    def path_for(self, rnd: int) -> Path:
        """Where round rnd's checkpoint lives."""
        return self.directory / f"ckpt-r{rnd:05d}.bin"

    def rounds(self) -> list[int]:
        """Rounds that have a checkpoint file (valid or not), ascending."""
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _NAME.match(p.name)))

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write a checkpoint atomically and durably, then prune old ones."""
        arrays: dict[str, np.ndarray] = {}
        header: dict[str, Any] = {
            "version": 2,
            "kind": "checkpoint",
            "job": self.job,
            "run_id": checkpoint.run_id,
            "round": checkpoint.round,
        }
        model_file = self._model_file(checkpoint)
        if model_file is None:
            arrays.update({f"model/{k}": v for k, v in checkpoint.model.items()})
        else:
            header["model_sha256"] = model_file
        header["strategy"] = _flatten(checkpoint.strategy_state, arrays)
        header["records"] = checkpoint.records
        frames = encode_frames(header, arrays)
        digest = hashlib.sha256()
        for frame in frames:
            digest.update(frame)
        path = self.path_for(checkpoint.round)
        failpoints.hit("checkpoint.before_write")
        atomic_write(path, [MAGIC, digest.digest(), *frames])
        failpoints.hit("checkpoint.after_write")
        self._prune()
        return path

    def _model_file(self, checkpoint: Checkpoint) -> str | None:
        """The sha256 of the round's model file if it holds exactly this model, else None (embed it)."""
        sha, size = self.models.digest(checkpoint.round, checkpoint.model)
        try:
            on_disk = self.models.path_for(checkpoint.round).stat().st_size
        except OSError:
            return None
        return sha if on_disk == size else None

    def _prune(self) -> None:
        for rnd in self.rounds()[: -self.keep]:
            try:
                self.path_for(rnd).unlink()
            except OSError as exc:
                log.warning("checkpoint.prune_failed", path=str(self.path_for(rnd)), error=exc.strerror)

    def load(self, rnd: int) -> Checkpoint:
        """Read and verify one checkpoint, or raise CheckpointError."""
        path = self.path_for(rnd)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{path}: {exc.strerror}") from None
        head = len(MAGIC) + 32
        if len(data) < head or not data.startswith(MAGIC):
            raise CheckpointError(f"{path}: not a checkpoint (bad magic or truncated header)")
        body = memoryview(data)[head:]
        if hashlib.sha256(body).digest() != data[len(MAGIC) : head]:
            raise CheckpointError(f"{path}: checksum mismatch (corrupt or truncated)")
        try:
            header, offset = decode_header(body, _LIMITS)
            arrays = decode_arrays(body, offset, header.get("arrays"), _LIMITS)
        except Rejection as exc:
            raise CheckpointError(f"{path}: {exc.reason}: {exc.detail}") from None
        if header.get("kind") != "checkpoint" or header.get("job") != self.job:
            raise CheckpointError(f"{path}: belongs to job {header.get('job')!r}, not {self.job!r}")
        model = {k.removeprefix("model/"): np.array(v) for k, v in arrays.items() if k.startswith("model/")}
        named = header.get("model_sha256")
        if isinstance(named, str):
            try:
                model = self.models.load_verified(int(header["round"]), named)
            except ModelFileError as exc:
                raise CheckpointError(f"{path}: the model it names is unusable: {exc}") from None
        return Checkpoint(
            round=int(header["round"]),
            run_id=str(header["run_id"]),
            model=model,
            strategy_state=_unflatten(header.get("strategy") or {}, arrays),
            records=dict(header.get("records") or {}),
        )

    def load_latest(self, on_corrupt: Callable[[int, str], None] | None = None) -> Checkpoint | None:
        """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
        for rnd in reversed(self.rounds()):
            try:
                return self.load(rnd)
            except CheckpointError as exc:
                log.error("checkpoint.corrupt", round=rnd, error=str(exc), action="using the previous one")
                if on_corrupt:
                    on_corrupt(rnd, str(exc))
        return None
