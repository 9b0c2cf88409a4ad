"""The largest file a job writes or reads, against ``[limits]`` and the SyftBox server's cap.

A file over the server's cap never travels: the round then times out with the
reason only in a sync client's log. So the sizes are worked out from the model
before anything runs, at ``--check`` and at start, and a job that cannot work
is refused with the numbers and the fix (exit 78).

- native: the model is published whole, or in parts of ``syftbox.part_bytes``;
  the datasites split their results at their own part size (the runner's
  ``--part-bytes``), which is theirs to set.
- syft-flwr: every request and every reply carries the whole model in base64
  (more when encrypted), and syft-rpc cannot split a message.
"""

from __future__ import annotations

import math

from fl_orchestrator.config.schema import JobConfig
from fl_orchestrator.protocols.syft_flwr.envelope import message_file_bound
from fl_orchestrator.wire.messages import ModelSpec

# A published model's header: names, dtypes and shapes, and the envelope.
_MODEL_HEADER_BYTES = 64 * 1024


def size_problems(config: JobConfig, spec: ModelSpec) -> list[str]:
    """Why files of this job would be too large to travel or be read; empty if none."""
    arrays = [math.prod(shape) * dtype.itemsize for dtype, shape in spec.values()]
    if config.job.protocol == "syft-flwr":
        return _syft_flwr_problems(config, arrays)
    return _native_problems(config, sum(arrays) + _MODEL_HEADER_BYTES)


def _native_problems(config: JobConfig, model_file: int) -> list[str]:
    cap, part = config.syftbox.server_max_file_bytes, config.syftbox.part_bytes
    if not cap:
        return []
    if part == 0 and model_file > cap:
        return [
            f"syftbox.part_bytes = 0 never splits the model file, which takes about {model_file} bytes,"
            f" over syftbox.server_max_file_bytes = {cap}: set syftbox.part_bytes to at most {cap}"
        ]
    if part > cap and model_file > cap:
        return [
            f"syftbox.part_bytes = {part} is over syftbox.server_max_file_bytes = {cap}, and the model"
            f" file (about {model_file} bytes) is split into parts of that size: set part_bytes to at"
            f" most {cap}"
        ]
    return []


def _syft_flwr_problems(config: JobConfig, arrays: list[int]) -> list[str]:
    encrypted = config.syft_flwr.encryption
    bound = message_file_bound(arrays, encrypted=encrypted)
    model = sum(arrays)
    how = "encrypted: about 2.4 x the arrays" if encrypted else "about 1.33 x the arrays"
    problems = []
    cap = config.syftbox.server_max_file_bytes
    if cap and bound > cap:
        room = _largest_model(cap, len(arrays), encrypted=encrypted)
        problems.append(
            f"syftbox.server_max_file_bytes = {cap}, but every syft-flwr request and reply carries the"
            f" whole model, {model} bytes of arrays, in a file of up to {bound} bytes ({how}), and"
            f" syft-rpc cannot split a message: use job.protocol = 'native' (it splits the model into"
            f" parts), a model of at most {room} bytes, or raise the cap if your server takes larger files"
        )
    limit = config.limits.max_file_bytes
    if limit and bound > limit:
        problems.append(
            f"limits.max_file_bytes = {limit}, but a reply to this model takes up to {bound} bytes ({how}):"
            " raise it, or set it to 0 so that it follows the model"
        )
    return problems


def _largest_model(cap: int, count: int, *, encrypted: bool) -> int:
    """The most bytes of arrays whose message still fits under cap (message_file_bound, inverted)."""
    room = cap - 1024 * 1024
    payload = room * 27 // 64 if encrypted else room * 3 // 4
    return max(0, payload - 1024 * count)
