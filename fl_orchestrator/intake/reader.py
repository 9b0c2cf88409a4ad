"""The decoding edge: one inbound path becomes one event or one rejection.

Runs in a worker thread. Reads the file without following any link and
judges its size before reading (intake/safe_read.py), decodes it, and checks
the result against the round's global model: names, dtypes, shapes,
finiteness, overflow and, optionally, the update's L2 norm (``check_arrays``,
the one validator of every protocol's results). Nothing raised by a hostile
file gets past ``read_inbound``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from fl_orchestrator.aggregation.clipping import clip_factor, clip_update, update_norm
from fl_orchestrator.aggregation.guard import largest_magnitude, magnitude_limit
from fl_orchestrator.config.schema import LimitsSection
from fl_orchestrator.core.reasons import Reason, Rejection, describe, printable
from fl_orchestrator.intake.safe_read import FileIdentity, FolderCache, read_below
from fl_orchestrator.wire.frames import FrameLimits, Weights, decode_header
from fl_orchestrator.wire.layout import FileKind, JobLayout, task_id_of_result
from fl_orchestrator.wire.messages import (
    HeartbeatMessage,
    ModelSpec,
    PartsMessage,
    ResultMessage,
    check_finite,
    check_weights_match,
    decode_message,
    model_spec,
)
from fl_orchestrator.wire.parts import MIN_PART_BYTES, assemble, part_name

log = structlog.get_logger("fl_orchestrator.intake")

HEARTBEAT_MAX_BYTES = 64 * 1024
# Results at least this large are hashed in a second thread while they are checked.
_HASH_BESIDE_BYTES = 1 << 20
# A refused file this small hands its bytes, as read, to the quarantine: it is copied
# from memory, without opening the file again (most junk is this small).
REFUSED_CONTENT_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class Inbound:
    """A decoded inbound file.

    ``update_norm`` is the L2 norm of (result - global model) when the norm
    bound is on; ``clipped`` says the arrays were scaled down to the bound.
    ``refusal``, on a failure result, also quarantines the file it came from
    (a reply that counts as the datasite's failure but is itself unusable).
    ``alive`` says the file proves its datasite is up now (an answer to a
    request of ours), not only when it was written.
    """

    path: Path
    datasite: str
    identity: FileIdentity
    message: ResultMessage | HeartbeatMessage
    update_norm: float | None = None
    clipped: bool = False
    sha256: str | None = None  # of the bytes validated (a result's whole file, or its joined parts)
    refusal: tuple[Reason, str] | None = None
    alive: bool = False


@dataclass(frozen=True)
class ResultHandle:
    """A counted result as the intake validated it: its path, which file, which bytes.

    ``message`` is None when the handle was rebuilt from the round log: the
    shell reads the file again and checks it is still these bytes.
    """

    path: Path
    identity: FileIdentity
    sha256: str | None
    message: ResultMessage | None


@dataclass(frozen=True)
class Refused:
    """An inbound file the edge refused; ``content``: its bytes as read, if it was small."""

    path: Path
    datasite: str
    reason: Reason
    detail: str
    identity: FileIdentity | None
    content: bytes | None = None


def frame_limits_for(limits: LimitsSection) -> FrameLimits:
    """The codec's limits for files from datasites, taken from ``[limits]``."""
    return FrameLimits(
        max_header_bytes=limits.max_header_bytes,
        max_arrays=limits.max_arrays,
        max_ndim=limits.max_array_dims,
        max_elements=limits.max_array_elements,
        max_container_len=limits.max_msgpack_container_len,
        max_map_entries=limits.max_metrics,
        max_str_len=limits.max_msgpack_str_bytes,
        max_depth=limits.max_msgpack_depth,
    )


class InboundReader:
    """Reads and validates files that datasites write for one job.

    The daemon must call ``set_global_model`` after every aggregation so that
    the norm bound is measured against the model each round was sent.
    """

    def __init__(
        self,
        layout: JobLayout,
        datasites: frozenset[str],
        spec: ModelSpec,
        limits: LimitsSection,
        *,
        global_model: Mapping[str, np.ndarray] | None = None,
        global_model_round: int | None = None,
    ) -> None:
        self.layout = layout
        self.datasites = datasites
        self.limits = limits
        self.frame_limits = frame_limits_for(limits)
        self.folders = FolderCache()
        if global_model is None and limits.max_update_norm > 0:
            raise ValueError("[limits] max_update_norm needs the global model: pass global_model=")
        check_model_fits(spec if global_model is None else model_spec(global_model), limits)
        # One attribute, swapped whole: a worker thread reading a result while
        # the round loop installs the next model sees the old triple or the new.
        self._model: tuple[Weights | None, ModelSpec, int | None] = (None, spec, None)
        if global_model is not None:
            self.set_global_model(global_model, global_model_round)

    @property
    def result_limit(self) -> int:
        """The largest result file this model allows (``result_size_limit``)."""
        return result_size_limit(self._model[1], self.limits)

    @property
    def spec(self) -> ModelSpec:
        """Names, dtypes and shapes every ok result must have."""
        return self._model[1]

    def set_global_model(self, model: Mapping[str, np.ndarray], rnd: int | None = None) -> None:
        """Install the model that results of round ``rnd`` (None: of any round) are measured against.

        With a round, results claiming another round skip the norm bound: the
        round machine refuses them anyway (``round_closed``, ``unknown_round``),
        and a straggler measured against the next round's model would be
        refused for the wrong reason.
        """
        spec = model_spec(model)
        try:
            check_model_fits(spec, self.limits)
        except ValueError as exc:  # called between rounds: say it, do not stop the job
            log.error("limits.model_does_not_fit", error=str(exc))
        self._model = (dict(model), spec, rnd)

    def read_inbound(self, path: Path, kind: FileKind, datasite: str) -> Inbound | Refused:
        """Read, decode and check one file; never raises for anything the file contains."""
        identity: FileIdentity | None = None
        data: memoryview | None = None
        try:
            if datasite not in self.datasites:
                raise Rejection(Reason.UNKNOWN_DATASITE, f"{datasite!r} is not in this job")
            self._check_name(path, kind, datasite)
            limit = HEARTBEAT_MAX_BYTES if kind == FileKind.HEARTBEAT else self.result_limit
            data, identity = read_below(
                self.layout.datasites_dir,
                path,
                limit,
                refuse_sparse=self.limits.refuse_sparse_files,
                folders=self.folders,
            )
            if kind == FileKind.HEARTBEAT:
                beat = decode_message(
                    data, expect_kind="heartbeat", expect_job=self.layout.job, limits=self.frame_limits
                )
                assert isinstance(beat, HeartbeatMessage)
                return Inbound(path, datasite, identity, beat)
            joined = self._join_parts(self.layout.datasites_dir, path, data, limit)
            # Whatever is folded later must be these bytes: their hash is taken now, in a
            # second thread while they are decoded and checked (hashlib and numpy both
            # release the GIL), since the hash alone cost as much as all the rest.
            if joined.nbytes < _HASH_BESIDE_BYTES:
                sha256 = _sha256_hex(joined)
                result, norm, clipped = self.check_result(joined, task_id_of_result(path))
            else:
                with ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake-hash") as pool:
                    hashing = pool.submit(_sha256_hex, joined)
                    result, norm, clipped = self.check_result(joined, task_id_of_result(path))
                    sha256 = hashing.result()
            return Inbound(path, datasite, identity, result, norm, clipped, sha256)
        except Rejection as exc:
            content = bytes(data) if data is not None and data.nbytes <= REFUSED_CONTENT_MAX_BYTES else None
            return Refused(path, datasite, exc.reason, exc.detail, identity, content)
        except Exception as exc:  # a bug here must cost one file, not the daemon
            log.exception("intake.internal_error", path=printable(str(path)), datasite=datasite)
            return Refused(path, datasite, Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", identity)

    def read_counted(self, root: Path, path: Path, sha256: str | None, reply_to: str) -> ResultMessage:
        """Read a result counted before a restart, from under ``root``; raise Rejection if it changed.

        ``root`` is the datasites folder, or the state folder's copy of the
        counted files (storage/kept.py), whose files have a second link: ours.
        ``reply_to`` is the task the round log says it answered.
        """
        data, _ = read_below(root, path, self.result_limit, max_links=2, folders=self.folders)
        data = self._join_parts(root, path, data, self.result_limit, max_links=2)
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise Rejection(Reason.CHANGED_AFTER_COUNT, "its bytes are not the ones validated when counted")
        result, _, _ = self.check_result(data, reply_to)
        return result

    def _join_parts(
        self, root: Path, path: Path, data: memoryview, limit: int, *, max_links: int = 1
    ) -> memoryview:
        """A result written as parts: read them beside it and join them (wire/parts.py)."""
        try:
            header, _ = decode_header(data, self.frame_limits)
        except Rejection:
            return data  # not a parts file: the full decode says what is wrong
        if header.get("kind") != "parts":
            return data
        manifest = decode_message(
            data, expect_kind="parts", expect_job=self.layout.job, limits=self.frame_limits
        )
        assert isinstance(manifest, PartsMessage)
        if manifest.nbytes > limit:
            raise Rejection(
                Reason.FILE_TOO_LARGE, f"its parts hold {manifest.nbytes} bytes; the limit is {limit}"
            )
        if manifest.parts > manifest.nbytes // MIN_PART_BYTES + 1:
            raise Rejection(
                Reason.BAD_FIELD,
                f"{manifest.parts} parts for {manifest.nbytes} bytes: a part holds at least {MIN_PART_BYTES}",
            )
        # Stat every part before reading any: waiting costs no reads, and the sizes
        # must add up before memory is spent on them.
        paths = [path.with_name(part_name(path.name, index)) for index in range(manifest.parts)]
        total = 0
        for index, part in enumerate(paths):
            try:
                total += os.lstat(part).st_size
            except FileNotFoundError:
                raise Rejection(
                    Reason.TRUNCATED, f"part {index} of {manifest.parts} has not arrived"
                ) from None
        if total != manifest.nbytes:
            raise Rejection(Reason.TRUNCATED, f"the parts hold {total} of {manifest.nbytes} bytes")
        chunks = []
        remaining = manifest.nbytes
        for part in paths:
            chunk, _ = read_below(root, part, remaining, max_links=max_links, folders=self.folders)
            remaining -= chunk.nbytes
            chunks.append(chunk)
        return assemble(chunks, manifest.nbytes, manifest.sha256)

    def check_result(
        self, data: bytes | bytearray | memoryview, name: str
    ) -> tuple[ResultMessage, float | None, bool]:
        """Decode a result file's bytes and check them against the round's model.

        ``name`` is the file's stem, which must equal ``reply_to``. Returns the
        result (with clipped arrays if the norm bound clipped it), the update
        norm (None when the bound is off) and whether it was clipped; raises
        Rejection. Needs no file, so it can be fuzzed directly.
        """
        result = decode_message(
            data,
            expect_kind="result",
            expect_job=self.layout.job,
            limits=self.frame_limits,
            max_metrics=self.limits.max_metrics,
            max_num_examples=self.limits.max_num_examples,
        )
        assert isinstance(result, ResultMessage)
        if result.envelope.reply_to != name:
            raise Rejection(
                Reason.REPLY_TO_MISMATCH,
                f"the file is named {describe(name)} but answers {describe(result.envelope.reply_to)}",
            )
        return self.check_arrays(result)

    def check_arrays(self, result: ResultMessage) -> tuple[ResultMessage, float | None, bool]:
        """Check a decoded result's arrays against the round's model, whatever the wire.

        The one validator every protocol's results pass: names, dtypes and
        shapes, the overflow bound and the update-norm bound (refuse or clip).
        Returns the result (clipped if it was), its update norm (None when
        neither the bound nor the outlier rule is on, or when the result is of
        another round than the model) and whether it was clipped; raises
        Rejection.
        """
        model, spec, model_round = self._model
        if not result.ok or result.action == "evaluate":
            return result, None, False  # no weights to check
        bound = self.limits.max_update_norm
        measured = (bound > 0 or self.limits.outlier_norm_factor > 0) and model is not None
        if model_round is not None and result.envelope.round != model_round:
            measured = False  # another round's result is measured against another model
        check_weights_match(result.arrays, spec, finite=not measured)
        norm: float | None = None
        if measured:
            assert model is not None
            norm = update_norm(result.arrays, model)
            if not math.isfinite(norm):
                check_finite(result.arrays)  # NaN or Inf, or only a norm too large for float64
        largest = largest_magnitude(result.arrays)
        limit = magnitude_limit(result.num_examples, len(self.datasites))
        if largest >= limit:
            raise Rejection(
                Reason.OVERFLOW,
                f"a value of magnitude {largest:.3g} with num_examples {result.num_examples} could overflow"
                f" the round's float64 sum (limit {limit:.3g} for {len(self.datasites)} datasites)",
            )
        if norm is None or bound <= 0 or norm <= bound:
            return result, norm, False
        # A norm that overflowed float64 cannot be scaled meaningfully: refuse it.
        if self.limits.update_norm_action == "clip" and math.isfinite(norm) and model is not None:
            clipped = clip_update(result.arrays, model, clip_factor(norm, bound))
            return dataclasses.replace(result, arrays=clipped), norm, True
        raise Rejection(Reason.NORM_EXCEEDED, f"update norm {norm:.6g} is over max_update_norm {bound:g}")

    def _check_name(self, path: Path, kind: FileKind, datasite: str) -> None:
        classified = self.layout.classify(path)
        if classified is None or classified.datasite != datasite or classified.kind != kind:
            raise Rejection(Reason.BAD_NAME, f"not a {kind.value} path of this job")
        if classified.bad_name:
            raise Rejection(Reason.BAD_NAME, "expected results/<1-64 letters or digits>.result")


def _sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def result_size_limit(spec: ModelSpec, limits: LimitsSection) -> int:
    """The largest result an honest datasite writes for this model: its arrays plus a header.

    A msgpack header of at most ``max_header_bytes``, then one bin per array
    (a 5-byte prefix and the array's bytes). ``max_file_bytes``, when set,
    is used instead. Anything larger is refused from its size alone.
    """
    if limits.max_file_bytes:
        return limits.max_file_bytes
    return limits.max_header_bytes + sum(
        math.prod(shape) * dtype.itemsize + 5 for dtype, shape in spec.values()
    )


def check_model_fits(spec: ModelSpec, limits: LimitsSection) -> None:
    """Raise ValueError if honest results for this model would break ``[limits]``.

    Every result would be refused otherwise, round after round; better to say
    so once, at start, naming the key to raise.
    """
    problems: list[str] = []
    if len(spec) > limits.max_arrays:
        problems.append(f"max_arrays = {limits.max_arrays} but the model has {len(spec)} arrays")
    payload = 0
    for name, (dtype, shape) in spec.items():
        if len(shape) > limits.max_array_dims:
            problems.append(f"max_array_dims = {limits.max_array_dims} but {name!r} has {len(shape)}")
        elements = math.prod(max(dim, 1) for dim in shape)
        if elements > limits.max_array_elements:
            problems.append(f"max_array_elements = {limits.max_array_elements} but {name!r} has {elements}")
        payload += math.prod(shape) * dtype.itemsize
    if 0 < limits.max_file_bytes < payload:
        problems.append(f"max_file_bytes = {limits.max_file_bytes} but the model's arrays take {payload}")
    if problems:
        raise ValueError("[limits] refuse every result for this model: " + "; ".join(problems))
