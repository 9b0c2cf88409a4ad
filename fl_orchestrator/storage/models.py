"""Global models on disk: the initial model, the per-round store and export."""

from __future__ import annotations

import hashlib
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl_orchestrator.config.schema import ModelSection
from fl_orchestrator.core.reasons import Rejection
from fl_orchestrator.storage.atomic import atomic_write
from fl_orchestrator.wire.frames import FrameLimits, Weights, wire_dtype_name
from fl_orchestrator.wire.messages import (
    Envelope,
    ModelMessage,
    decode_message,
    encode_model_frames,
    sha256_of_frames,
)

_ROUND_FILE = re.compile(r"^global-r(\d{5})\.msgpack$")
_MODEL_LIMITS = FrameLimits(max_header_bytes=16 * 1024 * 1024, max_elements=2**34)


class ModelFileError(Exception):
    """A model file that cannot be used (named in the message)."""


def initial_model(section: ModelSection) -> Weights:
    """Round 0's model: a seeded random init or a checkpoint file."""
    if section.source == "checkpoint":
        assert section.checkpoint_path is not None
        return load_weights_file(section.checkpoint_path)
    rng = np.random.default_rng(section.seed)
    model: Weights = {}
    for name in sorted(section.arrays):
        spec = section.arrays[name]
        shape = tuple(spec.shape)
        if spec.init == "zeros":
            values = np.zeros(shape)
        elif spec.init == "uniform":
            values = rng.uniform(-spec.scale, spec.scale, size=shape)
        else:
            values = rng.normal(0.0, spec.scale, size=shape)
        model[name] = values.astype(spec.dtype)
    return model


def load_weights_file(path: Path) -> Weights:
    """Read an .npz (no pickles) or a model .msgpack written by this project."""
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                model = {name: np.array(archive[name]) for name in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise ModelFileError(f"{path}: not a readable .npz ({exc})") from None
        for name, array in model.items():
            try:
                wire_dtype_name(array.dtype)
            except ValueError as exc:
                raise ModelFileError(f"{path}: array {name}: {exc}") from None
        return model
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{path}: {exc.strerror}") from None
    return _decode_model(path, data)


def _decode_model(path: Path, data: bytes) -> Weights:
    try:
        message = decode_message(data, expect_kind="model", expect_job=_job_of(data), limits=_MODEL_LIMITS)
    except Rejection as exc:
        raise ModelFileError(f"{path}: {exc.reason}: {exc.detail}") from None
    assert isinstance(message, ModelMessage)
    return {name: np.array(a) for name, a in message.arrays.items()}


def _job_of(data: bytes) -> str:
    """Model files are not tied to a job when loaded as checkpoints: accept their own."""
    from fl_orchestrator.wire.frames import decode_header

    try:
        header, _ = decode_header(data, _MODEL_LIMITS)
    except Rejection:
        return ""
    job = header.get("job")
    return job if isinstance(job, str) else ""


def model_message(job: str, rnd: int, model: Mapping[str, np.ndarray], message_id: str) -> ModelMessage:
    """Wrap a model for writing.

    No timestamp: the same model always encodes to the same bytes, so its
    content-addressed broadcast name is stable across restarts.
    """
    return ModelMessage(Envelope(job, rnd, message_id, None, 0.0, None), dict(model))


@dataclass(frozen=True)
class SavedModel:
    """A model file as ModelStore wrote it: a publisher may link it rather than write the model again."""

    path: Path
    sha256: str
    nbytes: int


class ModelStore:
    """state_dir/models/global-rNNNNN.msgpack, one per completed round (0 = initial)."""

    def __init__(self, state_dir: Path, job: str) -> None:
        self.directory = state_dir / "models"
        self.job = job
        # The last model saved (held, so it is the same object), its sha256 and size: naming it
        # again costs no second hash.
        self._last: tuple[int, Mapping[str, np.ndarray], str, int] | None = None

    def path_for(self, rnd: int) -> Path:
        """Where round rnd's model is kept."""
        return self.directory / f"global-r{rnd:05d}.msgpack"

    def save(self, rnd: int, model: Mapping[str, np.ndarray]) -> Path:
        """Write round rnd's model atomically and durably."""
        path = self.path_for(rnd)
        frames = self._frames(rnd, model)
        atomic_write(path, frames)
        self._last = (rnd, model, sha256_of_frames(frames), sum(memoryview(f).nbytes for f in frames))
        return path

    def digest(self, rnd: int, model: Mapping[str, np.ndarray]) -> tuple[str, int]:
        """The sha256 and size ``save`` writes for this model (the encoding is deterministic)."""
        if self._last is not None and self._last[0] == rnd and self._last[1] is model:
            return self._last[2], self._last[3]
        frames = self._frames(rnd, model)
        return sha256_of_frames(frames), sum(memoryview(f).nbytes for f in frames)

    def saved(self, rnd: int, model: Mapping[str, np.ndarray]) -> SavedModel | None:
        """Round rnd's model file, if it holds exactly this model's bytes; else None."""
        written_here = self._last is not None and self._last[0] == rnd and self._last[1] is model
        sha, nbytes = self.digest(rnd, model)
        path = self.path_for(rnd)
        try:
            if path.stat().st_size != nbytes:
                return None
            # Not saved by this process (a resume): the file is checked, not trusted.
            if not written_here and hashlib.sha256(path.read_bytes()).hexdigest() != sha:
                return None
        except OSError:
            return None
        return SavedModel(path, sha, nbytes)

    def load_verified(self, rnd: int, sha256: str) -> Weights:
        """Round rnd's model, only if its file's bytes still hash to ``sha256`` (ModelFileError)."""
        path = self.path_for(rnd)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelFileError(f"{path}: {exc.strerror}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ModelFileError(f"{path}: its bytes changed since the checkpoint named them")
        return _decode_model(path, data)

    def _frames(self, rnd: int, model: Mapping[str, np.ndarray]) -> list[Any]:
        return encode_model_frames(model_message(self.job, rnd, model, f"r{rnd}"))

    def rounds(self) -> list[int]:
        """Rounds with a saved model, ascending."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = _ROUND_FILE.match(entry.name)
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def load(self, rnd: int) -> Weights:
        """Read round rnd's model."""
        return load_weights_file(self.path_for(rnd))


def export_npz(model: Mapping[str, np.ndarray], out: Path) -> None:
    """Write a model as .npz, atomically."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **dict(model))  # type: ignore[arg-type]
    atomic_write(out, [buffer.getbuffer()])
