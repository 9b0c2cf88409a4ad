"""Fuzzing the decoding edge: whatever the bytes, a message or a Rejection, nothing else.

The normal suite runs a bounded, derandomized pass (``FUZZ_EXAMPLES``,
default 300 examples per test). A longer, randomized run:

    FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/test_hostile_fuzz.py

Every test goes through ``InboundReader.check_result`` (decode, name =
reply_to, arrays against the model, update norm in clip mode), the same code
``read_inbound`` runs after reading a file; one test also goes through real
files and ``read_inbound``.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_orchestrator.aggregation.clipping import update_norm
from fl_orchestrator.config.schema import LimitsSection
from fl_orchestrator.core.reasons import MAX_DETAIL_CHARS, Reason, Rejection
from fl_orchestrator.intake.reader import Inbound, InboundReader, Refused
from fl_orchestrator.wire.frames import encode_bytes
from fl_orchestrator.wire.layout import FileKind, JobLayout
from fl_orchestrator.wire.messages import (
    Envelope,
    HeartbeatMessage,
    ResultMessage,
    decode_message,
    encode_heartbeat,
    model_spec,
)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
LONG_RUN = "FUZZ_EXAMPLES" in os.environ
# Derandomized in the normal suite: the same examples every run, so a failure
# reproduces and CI cannot flake. A long run explores new ground each time.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG_RUN,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

JOB = "fuzzjob"
SITE = "ds0@example.org"
NAME = "0123456789abcdef0123456789abcdef"
BOUND = 5.0
MODEL = {
    "w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3),
    "b": np.zeros(3, np.float32),
    "d": np.array([1.0, -2.0], np.float64),  # results near 1.7e308 overflow the float64 norm
    "n": np.array([3, 4], np.int16),
}
LIMITS = LimitsSection(
    max_update_norm=BOUND,
    update_norm_action="clip",
    max_metrics=8,
    max_arrays=8,
    max_msgpack_container_len=64,
    max_msgpack_str_bytes=1024,
    max_header_bytes=4096,
)


def reader_in(root: Path) -> InboundReader:
    layout = JobLayout(root, JOB, "agg@example.org")
    return InboundReader(layout, frozenset({SITE}), model_spec(MODEL), LIMITS, global_model=MODEL)


READER = reader_in(Path("/nonexistent-fuzz-root"))


def header(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "version": 1,
        "kind": "result",
        "job": JOB,
        "round": 3,
        "message_id": "f" * 32,
        "reply_to": NAME,
        "created": 1_700_000_000.5,
        "deadline": None,
        "status": "ok",
        "num_examples": 7,
        "metrics": {"loss": 0.25, "n": 3},
        "error": None,
    }
    base.update(changes)
    return base


def near(scale: float) -> dict[str, np.ndarray]:
    return {k: (v + np.asarray(scale, dtype=v.dtype) if v.dtype.kind != "i" else v) for k, v in MODEL.items()}


SEEDS = [
    encode_bytes(header(), near(0.1)),  # valid, within the bound
    encode_bytes(header(), near(3.0)),  # valid, clipped
    encode_bytes(header(status="error", num_examples=0, error={"type": "E", "message": "no data"}), {}),
    encode_heartbeat(HeartbeatMessage(Envelope(JOB, 0, "abc123", None, 1.0, None), "idle")),
    encode_bytes(header(kind="model"), MODEL),
]
INTERESTING = [
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\xc0",
    b"\xc1",
    b"\xc3",
    b"\xd4\x01\x00",  # fixext1
    b"\xdd\xff\xff\xff\xff",  # array32 of 4 G items
    b"\xdf\xff\xff\xff\xff",  # map32 of 4 G pairs
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xdb\x00\x01\x00\x00",  # str32 of 64 KiB
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # float64 NaN
    b"\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00",  # float64 +Inf
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # uint64 max
    b"\x91" * 40,  # nesting
]
POSITION = st.integers(0, 2**20)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), POSITION, st.integers(0, 7)),
    st.tuples(st.just("set"), POSITION, st.integers(0, 255)),
    st.tuples(st.just("interesting"), POSITION, st.sampled_from(INTERESTING)),
    st.tuples(st.just("truncate"), POSITION),
    st.tuples(st.just("delete"), POSITION, st.integers(1, 32)),
    st.tuples(st.just("insert"), POSITION, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("duplicate"), POSITION, st.integers(1, 64)),
    st.tuples(st.just("splice"), st.integers(0, len(SEEDS) - 1), POSITION, POSITION),
)


def mutate(data: bytes, mutation: tuple[Any, ...]) -> bytes:
    """One mutation of a file: bit flips, byte sets, truncations, cuts, inserts and splices."""
    buffer = bytearray(data)
    size = max(len(buffer), 1)
    kind, *args = mutation
    if kind == "flip" and buffer:
        buffer[args[0] % size] ^= 1 << args[1]
    elif kind == "set" and buffer:
        buffer[args[0] % size] = args[1]
    elif kind == "interesting":
        at = args[0] % size
        buffer[at : at + len(args[1])] = args[1]
    elif kind == "truncate":
        del buffer[args[0] % size :]
    elif kind == "delete":
        at = args[0] % size
        del buffer[at : at + args[1]]
    elif kind == "insert":
        at = args[0] % size
        buffer[at:at] = args[1]
    elif kind == "duplicate":
        at = args[0] % size
        buffer[at:at] = buffer[at : at + args[1]]
    elif kind == "splice":
        other = SEEDS[args[0]]
        buffer = buffer[: args[1] % size] + other[args[2] % max(len(other), 1) :]
    return bytes(buffer)


def check_or_reject(data: bytes) -> ResultMessage | None:
    """The property: check_result returns a consistent result or raises Rejection, nothing else."""
    try:
        result, norm, clipped = READER.check_result(data, NAME)
    except Rejection as exc:
        assert isinstance(exc.reason, Reason)
        assert exc.reason != Reason.INTERNAL_ERROR
        assert len(exc.detail) <= MAX_DETAIL_CHARS and exc.detail.isprintable()
        return None
    assert result.envelope.reply_to == NAME and result.envelope.job == JOB
    if result.ok:
        assert result.arrays.keys() == MODEL.keys()
        assert 1 <= result.num_examples <= LIMITS.max_num_examples
        for name, array in result.arrays.items():
            assert array.dtype == MODEL[name].dtype and array.shape == MODEL[name].shape
            assert array.dtype.kind != "f" or np.isfinite(array).all()
        assert norm is not None and math.isfinite(norm)
        if clipped:
            assert norm > BOUND
            # float32/int16 rounding after the scale: the bound holds to within it
            assert update_norm(result.arrays, MODEL) <= BOUND * 1.001 + 1.0
        else:
            assert norm <= BOUND
    for key, value in result.metrics.items():
        assert isinstance(key, str) and not isinstance(value, bool)
        assert isinstance(value, int) or math.isfinite(value)
    return result


def test_the_seeds_decode() -> None:
    first, second = check_or_reject(SEEDS[0]), check_or_reject(SEEDS[1])
    assert first is not None and second is not None and check_or_reject(SEEDS[2]) is not None
    _, _, clipped = READER.check_result(SEEDS[1], NAME)
    assert clipped


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_a_result_or_a_rejection(data: bytes) -> None:
    check_or_reject(data)
    with contextlib.suppress(Rejection):
        decode_message(data, expect_kind="heartbeat", expect_job=JOB, limits=READER.frame_limits)


@FUZZ
@given(seed=st.integers(0, len(SEEDS) - 1), mutations=st.lists(MUTATION, min_size=1, max_size=6))
def test_mutated_valid_files_are_a_result_or_a_rejection(seed: int, mutations: list[tuple[Any, ...]]) -> None:
    data = SEEDS[seed]
    for mutation in mutations:
        data = mutate(data, mutation)
    check_or_reject(data)


MSGPACK_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
MSGPACK_VALUES = st.recursive(
    MSGPACK_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=40,
)
FIELDS = [*header(), "arrays", "sender", "state", "config"]


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(FIELDS), MSGPACK_VALUES, max_size=3),
    drop=st.sets(st.sampled_from(list(header())), max_size=2),
    bins=st.booleans(),
)
def test_forged_header_values_are_a_result_or_a_rejection(
    changes: dict[str, Any], drop: set[str], bins: bool
) -> None:
    head = {k: v for k, v in header().items() if k not in drop}
    head.update(changes)
    arrays = near(0.5)
    if "arrays" in changes:
        data = msgpack.packb(head, use_bin_type=True)
        if bins:
            data += b"".join(b"\xc4\x04" + np.float32(1).tobytes() for _ in range(3))
    else:
        data = encode_bytes(head, arrays if bins else None)
    check_or_reject(data)


FLOATS = st.floats(width=32) | st.sampled_from([0.0, -0.0, 1e-45, 3.4e38, -3.4e38])


@FUZZ
@given(
    w=st.lists(FLOATS, min_size=12, max_size=12),
    b=st.lists(FLOATS, min_size=3, max_size=3),
    d=st.lists(st.floats(width=64) | st.sampled_from([1.7e308, -1.7e308]), min_size=2, max_size=2),
    n=st.lists(st.integers(-(2**15), 2**15 - 1), min_size=2, max_size=2),
)
def test_any_values_are_refused_or_within_the_bound(
    w: list[float], b: list[float], d: list[float], n: list[int]
) -> None:
    arrays = {
        "w": np.array(w, np.float32).reshape(4, 3),
        "b": np.array(b, np.float32),
        "d": np.array(d, np.float64),
        "n": np.array(n, np.int16),
    }
    result = check_or_reject(encode_bytes(header(), arrays))
    finite = all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f")
    if not finite:
        assert result is None
    if result is not None:
        assert update_norm(result.arrays, MODEL) <= BOUND * 1.001 + 1.0


@pytest.fixture(scope="module")
def file_reader(tmp_path_factory: pytest.TempPathFactory) -> tuple[InboundReader, Path]:
    root = tmp_path_factory.mktemp("fuzz-files")
    reader = reader_in(root)
    results = reader.layout.results_dir(SITE)
    results.mkdir(parents=True)
    return reader, results / f"{NAME}.result"


@FUZZ
@given(seed=st.integers(0, len(SEEDS) - 1), mutations=st.lists(MUTATION, min_size=0, max_size=4))
def test_mutated_files_read_from_disk_are_a_result_or_a_refusal(
    file_reader: tuple[InboundReader, Path], seed: int, mutations: list[tuple[Any, ...]]
) -> None:
    reader, path = file_reader
    data = SEEDS[seed]
    for mutation in mutations:
        data = mutate(data, mutation)
    path.write_bytes(data)
    outcome = reader.read_inbound(path, FileKind.RESULT, SITE)
    assert isinstance(outcome, (Inbound, Refused))
    if isinstance(outcome, Refused):
        assert outcome.reason != Reason.INTERNAL_ERROR
    else:
        assert outcome.identity.size == len(data)
