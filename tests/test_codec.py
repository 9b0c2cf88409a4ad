"""The wire codec, file layout and permission files: round trips and exact rejection reasons."""

from __future__ import annotations

import contextlib
import hashlib
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fl_orchestrator.core.reasons import Reason, Rejection
from fl_orchestrator.wire.frames import (
    WIRE_DTYPES,
    FrameLimits,
    decode_header,
    encode_bytes,
    encode_frames,
    wire_dtype_name,
)
from fl_orchestrator.wire.layout import APP_NAME, Classified, FileKind, JobLayout, task_id_of_result
from fl_orchestrator.wire.messages import (
    Envelope,
    HeartbeatMessage,
    Message,
    ModelMessage,
    ModelRef,
    ResultMessage,
    TaskMessage,
    check_weights_match,
    decode_message,
    encode_heartbeat,
    encode_model_frames,
    encode_result_frames,
    encode_task,
    model_spec,
    sha256_of_frames,
)
from fl_orchestrator.wire.permissions import (
    LEGACY_FILE,
    PUB_FILE,
    aggregator_permissions,
    datasite_permissions,
)

JOB = "mnist-cnn"
LIMITS = FrameLimits()
# Derandomized: every run tries the same examples, so a failure reproduces and CI cannot flake.
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
ROUND_TRIP = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
DROP = object()

ENV = Envelope(JOB, 3, "abc123", "task42", 1_700_000_000.25, 1_700_000_600.0)
SHA = "0123456789abcdef" * 4


def join(frames: list[Any]) -> bytes:
    return b"".join(bytes(chunk) for chunk in frames)


def decode(
    data: bytes | bytearray,
    kind: str = "result",
    *,
    job: str = JOB,
    limits: FrameLimits = LIMITS,
    **kwargs: Any,
) -> Message:
    return decode_message(data, expect_kind=kind, expect_job=job, limits=limits, **kwargs)


def reject(data: bytes | bytearray, reason: Reason, kind: str = "result", **kwargs: Any) -> Rejection:
    with pytest.raises(Rejection) as info:
        decode(data, kind, **kwargs)
    assert info.value.reason is reason, info.value
    assert str(info.value).startswith(f"{reason.value}: ")
    return info.value


def header(kind: str = "result", /, **changes: Any) -> dict[str, Any]:
    """A valid header of one kind (for an ok result, arrays = [] until changed); DROP removes a field."""
    h: dict[str, Any] = {
        "version": 1,
        "kind": kind,
        "job": JOB,
        "round": 3,
        "message_id": "abc123",
        "reply_to": "task42",
        "created": 1_700_000_000.25,
        "deadline": None,
    }
    if kind == "result":
        h.update(status="ok", num_examples=10, metrics={"loss": 0.5}, error=None, arrays=[])
    elif kind == "heartbeat":
        h["state"] = "idle"
    elif kind == "task":
        h.update(attempt=0, model={"path": "models/m.msgpack", "sha256": SHA, "nbytes": 10}, config={})
    elif kind == "model":
        h["arrays"] = []
    for key, value in changes.items():
        if value is DROP:
            h.pop(key, None)
        else:
            h[key] = value
    return h


def pack(h: object, *bins: bytes) -> bytes:
    """A header then bins (msgpack picks bin8/16/32 by size, as any writer may)."""
    head: bytes = msgpack.packb(h, use_bin_type=True)
    return head + b"".join(msgpack.packb(b, use_bin_type=True) for b in bins)


def ok_result_bytes(arrays: dict[str, np.ndarray], **env_changes: Any) -> bytes:
    env = Envelope(**{**ENV.__dict__, **env_changes})
    return join(encode_result_frames(ResultMessage(env, True, 10, {"loss": 0.5}, arrays=arrays)))


def small_model() -> dict[str, np.ndarray]:
    return {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1.5, -2.0], dtype=np.float64),
        "step": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def assert_same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        assert got[name].tobytes() == np.ascontiguousarray(array).tobytes(), name


# ---- strategies ------------------------------------------------------------------------------------

ARRAY_NAMES = st.text(string.ascii_letters + string.digits + "_./:-", min_size=1, max_size=24)


@st.composite
def wire_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(sorted(WIRE_DTYPES))))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    array: np.ndarray = draw(hnp.arrays(dtype, shape))
    return array


WEIGHTS = st.dictionaries(ARRAY_NAMES, wire_arrays(), max_size=5)
METRICS = st.dictionaries(
    st.text(max_size=24),
    st.one_of(st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False)),
    max_size=8,
)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
ENVELOPES = st.builds(
    Envelope,
    job=st.just(JOB),
    round=st.integers(0, 2**64 - 1),
    message_id=st.text(string.ascii_letters + string.digits, min_size=1, max_size=64),
    reply_to=st.none() | st.text(max_size=64),
    created=FINITE,
    deadline=st.none() | FINITE,
)
MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


# ---- round trips -----------------------------------------------------------------------------------


@ROUND_TRIP
@given(env=ENVELOPES, arrays=WEIGHTS, metrics=METRICS, num_examples=st.integers(1, 10**12))
def test_result_round_trip(
    env: Envelope, arrays: dict[str, np.ndarray], metrics: dict[str, int | float], num_examples: int
) -> None:
    result = ResultMessage(env, True, num_examples, metrics, arrays=arrays)
    frames = encode_result_frames(result)
    data = bytearray(join(frames))
    decoded = decode(data)
    assert isinstance(decoded, ResultMessage)
    assert decoded.envelope == env
    assert decoded.ok is True
    assert decoded.num_examples == num_examples
    assert decoded.metrics == metrics
    assert decoded.error_type is None and decoded.error_message is None
    assert_same_arrays(decoded.arrays, arrays)
    # zero copy: every non-empty array is a view into the buffer the file was read into
    backing = np.frombuffer(data, dtype=np.uint8)
    for name, array in decoded.arrays.items():
        if array.size:
            assert np.shares_memory(array, backing), name
    # the checksum of the frames is the checksum of the file
    assert sha256_of_frames(frames) == hashlib.sha256(data).hexdigest()
    # and the result matches the spec of the arrays it was made from
    if _all_finite(arrays):
        check_weights_match(decoded.arrays, model_spec(arrays))


def _all_finite(arrays: dict[str, np.ndarray]) -> bool:
    return all(a.dtype.kind != "f" or bool(np.isfinite(a).all()) for a in arrays.values())


@ROUND_TRIP
@given(arrays=WEIGHTS)
def test_encoded_file_is_a_msgpack_stream(arrays: dict[str, np.ndarray]) -> None:
    data = join(encode_result_frames(ResultMessage(ENV, True, 5, {}, arrays=arrays)))
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    objects = list(unpacker)
    head, bins = objects[0], objects[1:]
    assert isinstance(head, dict)
    assert head["kind"] == "result" and head["version"] == 1
    assert head["arrays"] == [[name, a.dtype.name, list(a.shape)] for name, a in arrays.items()]
    assert bins == [
        np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes() for a in arrays.values()
    ]
    assert all(isinstance(b, bytes) for b in bins)


@ROUND_TRIP
@given(env=ENVELOPES, arrays=WEIGHTS)
def test_model_round_trip(env: Envelope, arrays: dict[str, np.ndarray]) -> None:
    data = join(encode_model_frames(ModelMessage(env, arrays)))
    decoded = decode(data, "model")
    assert isinstance(decoded, ModelMessage)
    assert decoded.envelope == env
    assert_same_arrays(decoded.arrays, arrays)


@ROUND_TRIP
@given(env=ENVELOPES, metrics=METRICS, etype=st.text(max_size=300), emsg=st.text(max_size=2500))
def test_error_result_round_trip(
    env: Envelope, metrics: dict[str, int | float], etype: str, emsg: str
) -> None:
    data = join(encode_result_frames(ResultMessage(env, False, 0, metrics, etype, emsg)))
    decoded = decode(data)
    assert decoded == ResultMessage(env, False, 0, metrics, etype[:200], emsg[:2000])


@ROUND_TRIP
@given(
    env=ENVELOPES,
    attempt=st.integers(0, 100),
    nbytes=st.integers(1, 2**40),
    config=st.dictionaries(
        st.text(max_size=16),
        st.one_of(
            st.integers(-(2**63), 2**63 - 1),
            FINITE,
            st.text(max_size=16),
            st.booleans(),
            st.binary(max_size=16),
            st.lists(st.integers(-(2**31), 2**31), max_size=4),
        ),
        max_size=6,
    ),
)
def test_task_round_trip(env: Envelope, attempt: int, nbytes: int, config: dict[str, Any]) -> None:
    task = TaskMessage(
        env, attempt, ModelRef("models/global-r00003-0123456789ab.msgpack", SHA, nbytes), config
    )
    assert decode(encode_task(task), "task") == task


@ROUND_TRIP
@given(env=ENVELOPES, state=st.text(max_size=64))
def test_heartbeat_round_trip(env: Envelope, state: str) -> None:
    assert decode(encode_heartbeat(HeartbeatMessage(env, state)), "heartbeat") == HeartbeatMessage(
        env, state[:32]
    )


def test_encode_converts_big_endian_and_non_contiguous() -> None:
    big = np.arange(12, dtype=">f4").reshape(3, 4)
    arrays = {"t": big.T, "s": big[:, ::2], "i": np.arange(3, dtype=">i2")}
    data = bytearray(join(encode_frames({"kind": "x"}, arrays)))
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(bytes(data))
    head, *bins = list(unpacker)
    assert head["arrays"] == [["t", "float32", [4, 3]], ["s", "float32", [3, 2]], ["i", "int16", [3]]]
    assert bins[0] == np.ascontiguousarray(big.T, dtype="<f4").tobytes()
    assert bins[1] == np.ascontiguousarray(big[:, ::2], dtype="<f4").tobytes()
    assert bins[2] == np.arange(3, dtype="<i2").tobytes()
    decoded = decode(ok_result_bytes(arrays))
    assert isinstance(decoded, ResultMessage)
    for name, array in arrays.items():
        assert np.array_equal(decoded.arrays[name], array)
        assert decoded.arrays[name].dtype == array.dtype.newbyteorder("=")


def test_encode_uses_bin32_for_every_array() -> None:
    data = join(encode_frames({}, {"a": np.zeros(0, np.uint8), "b": np.ones(3, np.uint8)}))
    head_len = len(msgpack.packb({"arrays": [["a", "uint8", [0]], ["b", "uint8", [3]]]}))
    assert data[head_len:] == b"\xc6\x00\x00\x00\x00" + b"\xc6\x00\x00\x00\x03\x01\x01\x01"


@pytest.mark.parametrize("dtype", [np.complex128, np.object_, "<U3", "datetime64[s]", np.void])
def test_unsupported_dtypes_cannot_be_encoded(dtype: Any) -> None:
    array = np.zeros(2, dtype=dtype)
    with pytest.raises(ValueError, match="cannot be sent"):
        wire_dtype_name(array.dtype)
    with pytest.raises(ValueError, match="cannot be sent"):
        encode_bytes({}, {"x": array})


def test_decoding_from_bytes_gives_read_only_views() -> None:
    decoded = decode(ok_result_bytes(small_model()))
    assert isinstance(decoded, ResultMessage)
    assert not decoded.arrays["w"].flags.writeable


def test_bin8_and_bin16_written_by_other_encoders_decode() -> None:
    small = np.arange(3, dtype=np.float32)
    medium = np.arange(100, dtype=np.float32)  # 400 bytes: bin16
    manifest = [["small", "float32", [3]], ["medium", "float32", [100]]]
    data = pack(header(arrays=manifest), small.tobytes(), medium.tobytes())
    assert data.count(b"\xc4\x0c") == 1 and b"\xc5\x01\x90" in data
    decoded = decode(bytearray(data))
    assert isinstance(decoded, ResultMessage)
    assert_same_arrays(decoded.arrays, {"small": small, "medium": medium})


# ---- never anything but a Rejection ---------------------------------------------------------------


def _decode_or_reject(data: bytes, kind: str, limits: FrameLimits = LIMITS) -> Message | None:
    try:
        message = decode(data, kind, limits=limits, max_metrics=4)
    except Rejection as exc:
        assert isinstance(exc.reason, Reason)
        return None
    if isinstance(message, ResultMessage) and message.ok:
        with contextlib.suppress(Rejection):
            check_weights_match(message.arrays, model_spec(small_model()))
    return message


@FUZZ
@given(data=st.binary(max_size=300), kind=st.sampled_from(["result", "heartbeat", "task", "model"]))
def test_random_bytes_decode_or_reject(data: bytes, kind: str) -> None:
    _decode_or_reject(data, kind)


@FUZZ
@given(
    kind=st.sampled_from(["result", "heartbeat", "task", "model"]),
    key=st.sampled_from(
        [
            "version",
            "kind",
            "job",
            "round",
            "message_id",
            "reply_to",
            "created",
            "deadline",
            "status",
            "num_examples",
            "metrics",
            "error",
            "arrays",
            "state",
            "attempt",
            "model",
            "config",
            "sender",
        ]
    ),
    value=MSGPACK_VALUES,
    tail=st.binary(max_size=16),
)
def test_forged_header_fields_decode_or_reject(kind: str, key: str, value: object, tail: bytes) -> None:
    data = pack(header(kind, **{key: value})) + tail
    _decode_or_reject(data, kind)


@FUZZ
@given(
    entry=st.lists(MSGPACK_VALUES, max_size=4)
    | st.tuples(ARRAY_NAMES, st.sampled_from([*WIRE_DTYPES, "<f4", "object"]), st.lists(MSGPACK_VALUES))
    | st.tuples(
        ARRAY_NAMES,
        st.sampled_from(list(WIRE_DTYPES)),
        st.lists(st.integers(0, 2**64 - 1) | st.integers(-3, 3), max_size=10),
    ),
    payload=st.binary(max_size=64),
    marker=st.sampled_from([b"", b"\xc4", b"\xc5", b"\xc6", b"\xd9", b"\x00"]),
)
def test_forged_manifests_decode_or_reject(entry: Any, payload: bytes, marker: bytes) -> None:
    h = header(arrays=[list(entry)])
    data = msgpack.packb(h, use_bin_type=True)
    data += msgpack.packb(payload, use_bin_type=True) if not marker else marker + payload
    for kind in ("result", "model"):
        _decode_or_reject(data, kind, FrameLimits(max_elements=2**20))


@FUZZ
@given(position=st.integers(0, 10**6), byte=st.integers(0, 255))
def test_single_byte_corruption_decodes_or_rejects(position: int, byte: int) -> None:
    data = bytearray(ok_result_bytes(small_model()))
    data[position % len(data)] = byte
    _decode_or_reject(bytes(data), "result")


def test_every_truncation_is_rejected_as_truncated() -> None:
    data = ok_result_bytes(small_model())
    assert len(data) < 400
    reject(data[:0], Reason.EMPTY_FILE)
    for size in range(1, len(data)):
        err = reject(data[:size], Reason.TRUNCATED)
        assert err.detail
    assert isinstance(decode(data), ResultMessage)


@pytest.mark.parametrize("kind", ["heartbeat", "task"])
def test_every_truncation_of_small_messages_is_rejected(kind: str) -> None:
    if kind == "heartbeat":
        data = encode_heartbeat(HeartbeatMessage(ENV, "training"))
    else:
        data = encode_task(TaskMessage(ENV, 1, ModelRef("models/m.msgpack", SHA, 9), {"lr": 0.1}))
    for size in range(1, len(data)):
        reject(data[:size], Reason.TRUNCATED, kind)


# ---- rejections: the file as bytes ----------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", bytearray(), memoryview(b"")])
def test_empty(data: Any) -> None:
    reject(data, Reason.EMPTY_FILE)


def test_header_too_large() -> None:
    limits = FrameLimits(max_header_bytes=64)
    reject(pack(header(metrics={f"m{i}": i for i in range(20)})), Reason.HEADER_TOO_LARGE, limits=limits)
    big_state = pack(header("heartbeat", state="x" * (2 * 1024 * 1024)))
    reject(big_state, Reason.HEADER_TOO_LARGE, "heartbeat")


def test_header_exactly_at_the_limit() -> None:
    data = encode_heartbeat(HeartbeatMessage(ENV, "idle"))
    assert isinstance(
        decode(data, "heartbeat", limits=FrameLimits(max_header_bytes=len(data))), HeartbeatMessage
    )
    reject(data, Reason.HEADER_TOO_LARGE, "heartbeat", limits=FrameLimits(max_header_bytes=len(data) - 1))


def test_header_limit_does_not_count_the_arrays() -> None:
    data = ok_result_bytes({"w": np.zeros(1000, np.float64)})
    limits = FrameLimits(max_header_bytes=256)
    assert len(data) > 8000
    assert isinstance(decode(data, limits=limits), ResultMessage)


@pytest.mark.parametrize(
    "data",
    # Each inside a map, as a header is: a file that starts with anything else is refused at byte one.
    [b"\x81\xa1a" + b"\x91" * 100_000, b"\x81\xa1a" * 40_000, b"\x81\xa1a" + b"\xdc\x00\x01" * 30_000],
    ids=["array-bomb", "map-bomb", "array16-bomb"],
)
def test_deep_nesting_is_malformed(data: bytes) -> None:
    err = reject(data, Reason.MALFORMED)
    assert err.detail.startswith("not msgpack")


@pytest.mark.parametrize(
    "data", [b"\xc6\xff\xff\xff\xff", b"\xdb\x00\x00\x10\x00abc", b"\xa5ab", b"\x92\x01", b"\xc5\x01"]
)
def test_a_cut_short_file_that_does_not_start_like_a_message_is_malformed_not_truncated(data: bytes) -> None:
    # These used to read as "truncated", which a file still arriving also gives, and so they
    # waited out the settle time before being refused.
    err = reject(data, Reason.MALFORMED)
    assert err.detail == f"not a message: it starts with byte 0x{data[0]:02x}, not a map"


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"\x81\x01", "its first key starts with byte 0x01, not a str"),
        (b"\xde\x00\x02\xc6\xff\xff\xff\xff", "its first key starts with byte 0xc6, not a str"),
        (b"\x82\xa3zzz\xdb\xff\xff\xff\xff", "its first key b'zzz' is no field"),
        (b"\x82\xd9\xff" + b"x" * 10, "its first key is 255 bytes long"),
    ],
)
def test_a_cut_short_map_that_cannot_be_a_header_is_malformed_at_once(data: bytes, detail: str) -> None:
    assert reject(data, Reason.MALFORMED).detail == f"not a message: {detail}"


def test_what_may_still_be_arriving_stays_truncated_and_whole_headers_keep_their_codes() -> None:
    for start in (b"\x8f", b"\xde\x00", b"\x82\xa7vers", b"\x82\xa7version\x01\xa4ki", b"\x82\xd9"):
        reject(start, Reason.TRUNCATED)
    assert isinstance(decode_header(b"\x80", LIMITS)[0], dict)
    reject(pack({"zzz": 1, **header()}), Reason.UNEXPECTED_FIELD)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xc6\xff\xff\xff\xff" + b"x" * 32, Reason.MALFORMED),  # bin32 of 4 GiB: not a map
        (b"\xdb\xff\xff\xff\xff" + b"x" * 32, Reason.MALFORMED),  # str32 of 4 GiB: not a map
        (b"\xdd\xff\xff\xff\xff" + b"\xc0" * 32, Reason.MALFORMED),  # array32 of 4 G items
        (b"\xdf\xff\xff\xff\xff" + b"\xc0" * 32, Reason.MALFORMED),  # map32 of 4 G pairs
        (b"\x81\xa3job\xc6\xff\xff\xff\xff" + b"x" * 32, Reason.TRUNCATED),  # inside the header map
        (b"\x81\xa1x\xdd\xff\xff\xff\xff", Reason.MALFORMED),
        (b"\xc9\xff\xff\xff\xff\x01" + b"x" * 32, Reason.MALFORMED),  # ext32, never allowed
    ],
)
def test_huge_declared_lengths(data: bytes, reason: Reason) -> None:
    reject(data, reason)


def test_huge_declared_length_beyond_header_limit() -> None:
    data = b"\x81\xa3job\xc6\xff\xff\xff\xff" + b"x" * 200
    reject(data, Reason.HEADER_TOO_LARGE, limits=FrameLimits(max_header_bytes=64))


def test_array_bin_declaring_4_gib() -> None:
    data = pack(header(arrays=[["w", "float32", [2]]])) + b"\xc6\xff\xff\xff\xff" + b"\x00" * 8
    err = reject(data, Reason.TRUNCATED)
    assert "needs 4294967295 bytes" in err.detail


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",
        b"\xa1",
        b"\x01",
        b"\xc0",
        b"\x93\x01\x02\x03",
        b"\xa5hello",
        b"\x81\x01\x02",
        b"\x81\xa1\xff\x01",
    ],
    ids=["reserved", "short-str", "int", "nil", "array", "str", "int-key", "bad-utf8"],
)
def test_not_a_header_map(data: bytes) -> None:
    reject(data, Reason.MALFORMED)


@pytest.mark.parametrize("kind", ["result", "model"])
def test_trailing_bytes_after_arrays(kind: str) -> None:
    if kind == "result":
        data = ok_result_bytes(small_model())
    else:
        data = join(encode_model_frames(ModelMessage(ENV, small_model())))
    err = reject(data + b"\x00", Reason.TRAILING_BYTES, kind)
    assert err.detail == "1 bytes after the last array"


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("heartbeat", encode_heartbeat(HeartbeatMessage(ENV, "idle")) + b"\xc0"),
        ("task", encode_task(TaskMessage(ENV, 0, ModelRef("m.msgpack", SHA, 1), {})) + b"\xc4\x00"),
        ("result", join(encode_result_frames(ResultMessage(ENV, False, 0, {}, "E", "m"))) + b"\xc4\x01x"),
    ],
)
def test_trailing_bytes_after_messages_without_arrays(kind: str, data: bytes) -> None:
    reject(data, Reason.TRAILING_BYTES, kind)


def test_error_result_declaring_arrays() -> None:
    h = header(status="error", error={"type": "E", "message": "m"}, arrays=[["w", "float32", [1]]])
    err = reject(pack(h, b"\x00" * 4), Reason.BAD_FIELD)
    assert err.detail == "an error result carries no arrays"


# ---- rejections: the header -----------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, -1, "1", 1.0, True, None, [1], DROP])
def test_wrong_version(version: object) -> None:
    reject(pack(header(version=version)), Reason.UNSUPPORTED_VERSION)


@pytest.mark.parametrize(
    ("kind", "expect"),
    [
        ("task", "result"),
        ("heartbeat", "result"),
        ("model", "result"),
        ("result", "heartbeat"),
        ("result", "model"),
    ],
)
def test_wrong_kind(kind: str, expect: str) -> None:
    err = reject(pack(header(kind)), Reason.WRONG_KIND, expect)
    assert err.detail == f"kind {kind!r} where {expect!r} was expected"


@pytest.mark.parametrize("kind", [None, 1, "RESULT", b"result", DROP])
def test_bad_kind_values(kind: object) -> None:
    reject(pack(header(kind=kind)), Reason.WRONG_KIND)


@pytest.mark.parametrize("kind", ["result", "heartbeat", "task", "model"])
def test_forged_sender_field(kind: str) -> None:
    err = reject(pack(header(kind, sender="mallory@example.org")), Reason.UNEXPECTED_FIELD, kind)
    assert "'sender'" in err.detail


def test_fields_of_another_kind_are_unexpected() -> None:
    err = reject(pack(header("heartbeat", num_examples=3, arrays=[])), Reason.UNEXPECTED_FIELD, "heartbeat")
    assert err.detail == "unexpected fields ['arrays', 'num_examples']"


def test_unexpected_bytes_and_str_keys_together() -> None:
    h: dict[Any, Any] = header()
    h[b"sender"] = "x"
    h["zz"] = 1
    err = reject(pack(h), Reason.UNEXPECTED_FIELD)
    assert "b'sender'" in err.detail and "'zz'" in err.detail


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        *[("result", f) for f in ("job", "round", "message_id", "reply_to", "created", "deadline")],
        *[("result", f) for f in ("status", "num_examples", "metrics", "error")],
        ("heartbeat", "state"),
        ("heartbeat", "created"),
        ("task", "attempt"),
        ("task", "model"),
        ("task", "config"),
        ("model", "arrays"),
        ("model", "round"),
    ],
)
def test_missing_field(kind: str, field: str) -> None:
    err = reject(pack(header(kind, **{field: DROP})), Reason.MISSING_FIELD, kind)
    assert err.detail == f"missing fields [{field!r}]"


def test_ok_result_without_arrays_field() -> None:
    err = reject(pack(header(arrays=DROP)), Reason.BAD_ARRAY_MANIFEST)
    assert err.detail == "arrays is not a list"


@pytest.mark.parametrize("kind", ["result", "heartbeat", "task", "model"])
def test_wrong_job(kind: str) -> None:
    err = reject(pack(header(kind, job="other-job")), Reason.WRONG_JOB, kind)
    assert err.detail == f"job 'other-job'; this server runs {JOB!r}"


@pytest.mark.parametrize(
    "message_id",
    ["", "a-b", "a b", "a_b", "x" * 65, "é", "١٢", "ａｂ", "abc\n", 5, None, b"abc"],
)
def test_bad_message_id(message_id: object) -> None:
    reject(pack(header(message_id=message_id)), Reason.BAD_FIELD)


def test_longest_message_id() -> None:
    decoded = decode(pack(header(message_id="Az09" * 16)))
    assert decoded.envelope.message_id == "Az09" * 16


@pytest.mark.parametrize(
    "changes",
    [
        {"round": -1},
        {"round": "3"},
        {"round": True},
        {"round": 3.0},
        {"job": 7},
        {"reply_to": 5},
        {"reply_to": "x" * 65},
        {"created": float("nan")},
        {"created": float("inf")},
        {"created": "now"},
        {"created": None},
        {"created": True},
        {"deadline": float("-inf")},
        {"deadline": "later"},
        {"status": "maybe"},
        {"status": None},
        {"error": {"type": "E", "message": "m"}},
        {"status": "error", "error": None},
        {"status": "error", "error": {"type": "E"}},
        {"status": "error", "error": {"type": 1, "message": "m"}},
        {"status": "error", "error": {"type": "E", "message": "m", "trace": ""}},
    ],
)
def test_bad_result_fields(changes: dict[str, Any]) -> None:
    reject(pack(header(**changes)), Reason.BAD_FIELD)


@pytest.mark.parametrize(
    "changes",
    [
        {"model": {"path": "../up.msgpack", "sha256": SHA, "nbytes": 1}},
        {"model": {"path": "models/../../x", "sha256": SHA, "nbytes": 1}},
        {"model": {"path": "/etc/passwd", "sha256": SHA, "nbytes": 1}},
        {"model": {"path": 5, "sha256": SHA, "nbytes": 1}},
        {"model": {"path": "m", "sha256": "z" * 64, "nbytes": 1}},
        {"model": {"path": "m", "sha256": SHA.upper(), "nbytes": 1}},
        {"model": {"path": "m", "sha256": SHA[:63], "nbytes": 1}},
        {"model": {"path": "m", "sha256": SHA, "nbytes": 0}},
        {"model": {"path": "m", "sha256": SHA, "nbytes": True}},
        {"model": {"path": "m", "sha256": SHA, "nbytes": 1, "extra": 1}},
        {"model": "models/m.msgpack"},
        {"config": [1]},
        {"config": None},
        {"attempt": "0"},
        {"attempt": False},
    ],
)
def test_bad_task_fields(changes: dict[str, Any]) -> None:
    reject(pack(header("task", **changes)), Reason.BAD_FIELD, "task")


@pytest.mark.parametrize("state", [None, 1, b"idle", ["idle"]])
def test_bad_heartbeat_state(state: object) -> None:
    reject(pack(header("heartbeat", state=state)), Reason.BAD_FIELD, "heartbeat")


# ---- rejections: num_examples and metrics ---------------------------------------------------------


@pytest.mark.parametrize("num_examples", [True, False, -1, 0, 10**12 + 1, 2**64 - 1, 1.5, 10.0, None, "3"])
def test_bad_num_examples(num_examples: object) -> None:
    reject(pack(header(num_examples=num_examples)), Reason.BAD_NUM_EXAMPLES)


def test_num_examples_limit_is_inclusive() -> None:
    decoded = decode(pack(header(num_examples=10)), max_num_examples=10)
    assert isinstance(decoded, ResultMessage) and decoded.num_examples == 10
    reject(pack(header(num_examples=11)), Reason.BAD_NUM_EXAMPLES, max_num_examples=10)


def test_error_result_ignores_num_examples() -> None:
    h = header(status="error", error={"type": "E", "message": "m"}, num_examples=-5)
    decoded = decode(pack(h))
    assert isinstance(decoded, ResultMessage) and not decoded.ok and decoded.num_examples == 0


@pytest.mark.parametrize(
    "metrics",
    [
        {"acc": "high"},
        {"acc": None},
        {"acc": True},
        {"acc": [0.9]},
        {"acc": {"v": 1}},
        {"acc": b"\x01"},
        {"acc": float("nan")},
        {"acc": float("inf")},
        {"acc": float("-inf")},
        {"x" * 129: 1.0},
        {b"acc": 1.0},
        [["acc", 1.0]],
        None,
        "acc=1",
    ],
)
def test_bad_metrics(metrics: object) -> None:
    reject(pack(header(metrics=metrics)), Reason.BAD_METRICS)


def test_bad_metrics_on_error_results_too() -> None:
    h = header(status="error", error={"type": "E", "message": "m"}, metrics={"acc": "x"})
    reject(pack(h), Reason.BAD_METRICS)


def test_too_many_metrics() -> None:
    metrics = {f"m{i}": i for i in range(5)}
    err = reject(pack(header(metrics=metrics)), Reason.BAD_METRICS, max_metrics=4)
    assert err.detail == "5 metrics; the limit is 4"
    decoded = decode(pack(header(metrics=metrics)), max_metrics=5)
    assert isinstance(decoded, ResultMessage) and decoded.metrics == metrics
    reject(pack(header(metrics=dict.fromkeys(map(str, range(257)), 1))), Reason.BAD_METRICS)


# ---- rejections: the arrays -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    ["object", "complex128", "<U10", "<f4", "float32 ", "Float32", "float128", "bfloat16", "", 5, None],
)
def test_bad_dtype_strings(dtype: object) -> None:
    data = pack(header(arrays=[["w", dtype, [2]]]), b"\x00" * 8)
    reject(data, Reason.DTYPE_MISMATCH)
    model = pack(header("model", arrays=[["w", dtype, [2]]]), b"\x00" * 8)
    reject(model, Reason.DTYPE_MISMATCH, "model")


@pytest.mark.parametrize(("declared", "actual"), [(12, 8), (12, 16), (0, 4), (4, 0)])
def test_manifest_and_bin_sizes_disagree(declared: int, actual: int) -> None:
    data = pack(header(arrays=[["w", "uint8", [declared]]]), b"\x07" * actual)
    err = reject(data, Reason.BAD_ARRAY_MANIFEST)
    assert err.detail == f"array 'w' declares {declared} bytes but its bin holds {actual}"


@pytest.mark.parametrize(
    ("manifest", "detail"),
    [
        ({"w": ["float32", [1]]}, "arrays is not a list"),
        ([["w", "float32"]], "arrays[0] is not [name, dtype, shape]"),
        ([["w", "float32", [1], "extra"]], "arrays[0] is not [name, dtype, shape]"),
        (["w"], "arrays[0] is not [name, dtype, shape]"),
        ([["", "float32", [1]]], "arrays[0] has a bad name"),
        ([[5, "float32", [1]]], "arrays[0] has a bad name"),
        ([["x" * 257, "float32", [1]]], "arrays[0] has a bad name"),
        ([["w", "float32", [-1]]], "array 'w' has shape [-1]"),
        ([["w", "float32", [1.0]]], "array 'w' has shape [1.0]"),
        ([["w", "float32", [True]]], "array 'w' has shape [True]"),
        ([["w", "float32", "1"]], "array 'w' has a bad shape"),
        ([["w", "float32", [1] * 9]], "array 'w' has a bad shape"),
        ([["w", "float32", [2**31 + 1]]], "limit 2147483648 elements"),
        ([["w", "float32", [2**16, 2**16]]], "limit 2147483648 elements"),
        ([["w", "float32", [1]], ["w", "float32", [1]]], "array 'w' appears twice"),
    ],
)
def test_bad_manifest(manifest: object, detail: str) -> None:
    data = pack(header(arrays=manifest), b"\x00" * 4, b"\x00" * 4)
    err = reject(data, Reason.BAD_ARRAY_MANIFEST)
    assert detail in err.detail, err.detail


@pytest.mark.parametrize(
    "shape",
    [[0, 2**64 - 1], [0, 2**62], [0, 2**40], [2**63, 0], [0, *[2**31] * 7], [0, 2**20, 2**20]],
)
def test_huge_dimension_next_to_a_zero(shape: list[int]) -> None:
    # the array holds no bytes, so the empty bin matches; the shape alone must be refused
    for kind in ("result", "model"):
        h = header(kind, arrays=[["w", "float32", shape]])
        err = reject(pack(h, b""), Reason.BAD_ARRAY_MANIFEST, kind)
        assert err.detail == f"array 'w' has shape {shape}; limit 2147483648 elements"


def test_too_many_arrays() -> None:
    manifest = [[f"a{i}", "uint8", [0]] for i in range(3)]
    data = pack(header(arrays=manifest), b"", b"", b"")
    err = reject(data, Reason.BAD_ARRAY_MANIFEST, limits=FrameLimits(max_arrays=2))
    assert err.detail == "3 arrays; the limit is 2"
    assert isinstance(decode(data, limits=FrameLimits(max_arrays=3)), ResultMessage)


def test_element_limit_is_inclusive() -> None:
    data = pack(header(arrays=[["w", "uint8", [4, 4]]]), b"\x00" * 16)
    assert isinstance(decode(data, limits=FrameLimits(max_elements=16)), ResultMessage)
    reject(data, Reason.BAD_ARRAY_MANIFEST, limits=FrameLimits(max_elements=15))


def test_empty_array_with_large_zero_dimension_product_is_accepted() -> None:
    data = pack(header(arrays=[["w", "float32", [0, 1000, 1000]]]), b"")
    decoded = decode(data)
    assert isinstance(decoded, ResultMessage) and decoded.arrays["w"].shape == (0, 1000, 1000)


def test_array_payload_not_a_bin() -> None:
    data = msgpack.packb(header(arrays=[["w", "uint8", [2]]]), use_bin_type=True) + msgpack.packb("ab")
    err = reject(data, Reason.MALFORMED)
    assert "not a msgpack bin" in err.detail


def test_missing_array_payload() -> None:
    data = pack(header(arrays=[["w", "uint8", [2]], ["v", "uint8", [1]]]), b"ab")
    err = reject(data, Reason.TRUNCATED)
    assert err.detail == "the file ends before array 'v'"


# ---- check_weights_match --------------------------------------------------------------------------


def _decoded_small_model(
    change: Callable[[dict[str, np.ndarray]], object] | None = None,
) -> dict[str, np.ndarray]:
    model = small_model()
    if change is not None:
        change(model)
    decoded = decode(bytearray(ok_result_bytes(model)))
    assert isinstance(decoded, ResultMessage)
    return decoded.arrays


def _match(arrays: dict[str, np.ndarray]) -> Rejection:
    with pytest.raises(Rejection) as info:
        check_weights_match(arrays, model_spec(small_model()))
    return info.value


def test_matching_weights_pass() -> None:
    check_weights_match(_decoded_small_model(), model_spec(small_model()))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["w", "b"])
def test_non_finite_weights(bad: float, name: str) -> None:
    def poison(model: dict[str, np.ndarray]) -> None:
        model[name] = model[name].copy()
        model[name].reshape(-1)[-1] = bad

    err = _match(_decoded_small_model(poison))
    assert err.reason is Reason.NON_FINITE
    assert err.detail == f"{name} holds NaN or Inf"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_found_past_the_first_block(dtype: Any) -> None:
    array = np.zeros(200_000, dtype=dtype)
    array[150_001] = np.nan
    with pytest.raises(Rejection) as info:
        check_weights_match({"big": array}, model_spec({"big": array}))
    assert info.value.reason is Reason.NON_FINITE


def test_integer_arrays_are_never_non_finite() -> None:
    array = np.array([np.iinfo(np.int64).max, np.iinfo(np.int64).min])
    check_weights_match({"i": array}, model_spec({"i": array}))


def test_array_names_mismatch() -> None:
    arrays = _decoded_small_model(lambda m: m.update(extra=np.zeros(1, np.float32)))
    err = _match(arrays)
    assert err.reason is Reason.ARRAY_NAMES_MISMATCH
    assert err.detail == "missing [], unexpected ['extra']"
    arrays = _decoded_small_model(lambda m: m.pop("b"))
    err = _match(arrays)
    assert err.reason is Reason.ARRAY_NAMES_MISMATCH
    assert err.detail == "missing ['b'], unexpected []"


def test_array_order_does_not_matter() -> None:
    arrays = dict(reversed(list(_decoded_small_model().items())))
    check_weights_match(arrays, model_spec(small_model()))


def test_dtype_mismatch() -> None:
    err = _match(_decoded_small_model(lambda m: m.update(w=m["w"].astype(np.float64))))
    assert err.reason is Reason.DTYPE_MISMATCH
    assert err.detail == "w: float64 where float32 expected"


@pytest.mark.parametrize("shape", [(3, 2), (6,), (1, 2, 3), (2, 4)])
def test_shape_mismatch(shape: tuple[int, ...]) -> None:
    err = _match(_decoded_small_model(lambda m: m.update(w=np.zeros(shape, np.float32))))
    assert err.reason is Reason.SHAPE_MISMATCH
    assert err.detail == f"w: {shape} where (2, 3) expected"


def test_zero_d_against_one_element_is_a_shape_mismatch() -> None:
    err = _match(_decoded_small_model(lambda m: m.update(step=np.array([7], np.int64))))
    assert err.reason is Reason.SHAPE_MISMATCH


# ---- layout ---------------------------------------------------------------------------------------

ROOT = Path("/srv/SyftBox")
LAYOUT = JobLayout(ROOT, JOB, "agg@example.org")
SITE = "a@example.org"


def _under(*parts: str, site: str = SITE, job: str = JOB, app: str = APP_NAME) -> Path:
    return ROOT / "datasites" / site / "app_data" / app / job / Path(*parts)


def test_layout_paths() -> None:
    assert LAYOUT.datasites_dir == ROOT / "datasites"
    assert LAYOUT.aggregator_dir == ROOT / "datasites" / "agg@example.org" / "app_data" / APP_NAME / JOB
    assert LAYOUT.models_dir == LAYOUT.aggregator_dir / "models"
    assert LAYOUT.model_name(3, SHA) == "global-r00003-0123456789ab.msgpack"
    assert LAYOUT.task_path(SITE, "t1") == LAYOUT.aggregator_dir / "tasks" / SITE / "t1.task"
    assert LAYOUT.result_path(SITE, "t1") == _under("results", "t1.result")
    assert LAYOUT.heartbeat_path(SITE) == _under("heartbeat.msgpack")
    assert task_id_of_result(LAYOUT.result_path(SITE, "abc123")) == "abc123"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (_under("results", "abc123.result"), Classified(SITE, FileKind.RESULT)),
        (_under("results", ("Az09" * 16) + ".result"), Classified(SITE, FileKind.RESULT)),
        (_under("heartbeat.msgpack"), Classified(SITE, FileKind.HEARTBEAT)),
        (_under("heartbeat.msgpack", site="b@example.org"), Classified("b@example.org", FileKind.HEARTBEAT)),
        # writes still under way, and hidden files
        (_under("results", "abc123.result.tmp"), Classified(SITE, FileKind.IGNORED)),
        (_under("results", ".abc123.result"), Classified(SITE, FileKind.IGNORED)),
        (_under("heartbeat.msgpack.tmp"), Classified(SITE, FileKind.IGNORED)),
        (_under(".heartbeat.msgpack"), Classified(SITE, FileKind.IGNORED)),
        # names that mean nothing to the protocol
        (_under("results", "abc123.txt"), Classified(SITE, FileKind.IGNORED)),
        (_under("results"), Classified(SITE, FileKind.IGNORED)),
        (_under("syft.pub.yaml"), Classified(SITE, FileKind.IGNORED)),
        (_under("sub", "heartbeat.msgpack"), Classified(SITE, FileKind.IGNORED)),
        (_under("abc123.result"), Classified(SITE, FileKind.IGNORED)),
        # result files with bad names
        (_under("results", "ab-c.result"), Classified(SITE, FileKind.RESULT, bad_name=True)),
        (_under("results", "ab c.result"), Classified(SITE, FileKind.RESULT, bad_name=True)),
        (_under("results", "x" * 65 + ".result"), Classified(SITE, FileKind.RESULT, bad_name=True)),
        (_under("results", "abc\n.result"), Classified(SITE, FileKind.RESULT, bad_name=True)),
        (_under("results", "é.result"), Classified(SITE, FileKind.RESULT, bad_name=True)),
        (_under("results", "sub", "abc123.result"), Classified(SITE, FileKind.RESULT, bad_name=True)),
        (_under("results", "a", "b", "c.txt"), Classified(SITE, FileKind.RESULT, bad_name=True)),
        # outside this job
        (_under("results", "abc.result", job="other-job"), None),
        (_under("results", "abc.result", app="other_app"), None),
        (ROOT / "datasites" / SITE / "app_data" / APP_NAME / JOB, None),
        (ROOT / "datasites" / SITE / "public" / APP_NAME / JOB / "heartbeat.msgpack", None),
        (ROOT / "datasites" / SITE, None),
        (ROOT / "datasites", None),
        (ROOT / "other" / SITE / "app_data" / APP_NAME / JOB / "heartbeat.msgpack", None),
        (Path("/elsewhere") / "datasites" / SITE / "app_data" / APP_NAME / JOB / "heartbeat.msgpack", None),
        (Path("datasites") / SITE / "app_data" / APP_NAME / JOB / "heartbeat.msgpack", None),
    ],
)
def test_classify(path: Path, expected: Classified | None) -> None:
    assert LAYOUT.classify(path) == expected


def test_classify_round_trips_the_builders() -> None:
    assert LAYOUT.classify(LAYOUT.result_path(SITE, "abc")) == Classified(SITE, FileKind.RESULT)
    assert LAYOUT.classify(LAYOUT.heartbeat_path(SITE)) == Classified(SITE, FileKind.HEARTBEAT)
    # the aggregator's own tasks are under its datasite, not a result or heartbeat
    assert LAYOUT.classify(LAYOUT.task_path(SITE, "abc")) == Classified("agg@example.org", FileKind.IGNORED)


# ---- permissions ----------------------------------------------------------------------------------


def test_aggregator_permissions() -> None:
    files = aggregator_permissions(["a@example.org", "b@example.org"])
    assert set(files) == {PUB_FILE, LEGACY_FILE} == {"syft.pub.yaml", "syftperm.yaml"}
    pub = files[PUB_FILE]
    assert pub.startswith("rules:\n")
    assert "  - pattern: 'models/**'\n    access: {read: ['a@example.org', 'b@example.org']}\n" in pub
    assert "  - pattern: 'tasks/{{.UserEmail}}/**'\n    access: {read: ['USER']}\n" in pub
    assert pub.endswith("  - pattern: '**'\n    access: {read: []}\n")
    assert pub.index("models/**") < pub.index("tasks/") < pub.index("pattern: '**'")
    assert pub.count("- pattern:") == 3
    for line in pub.splitlines()[1:]:
        assert line.startswith(("  - pattern: '", "    access: {read: ["))
    legacy = files[LEGACY_FILE]
    for email in ("a@example.org", "b@example.org"):
        assert f"- path: 'models/**'\n  user: '{email}'\n  permissions: [read]\n" in legacy
    for email in ("a@example.org", "b@example.org"):
        assert f"- path: 'tasks/{email}/**'\n  user: '{email}'\n  permissions: [read]\n" in legacy
    assert "useremail" not in legacy and "'*'" not in legacy
    assert legacy.count("- path:") == 4
    assert "write" not in pub + legacy and "admin" not in pub + legacy
    assert "agg@" not in pub + legacy


def test_aggregator_permissions_single_datasite() -> None:
    files = aggregator_permissions(["only@example.org"])
    assert "access: {read: ['only@example.org']}" in files[PUB_FILE]
    assert files[LEGACY_FILE].count("- path: 'models/**'") == 1


def test_datasite_permissions_exact() -> None:
    files = datasite_permissions("agg@example.org")
    assert files == {
        PUB_FILE: "rules:\n  - pattern: '**'\n    access: {read: ['agg@example.org']}\n",
        LEGACY_FILE: "- path: '**'\n  user: 'agg@example.org'\n  permissions: [read]\n",
    }


def test_quotes_are_doubled() -> None:
    files = datasite_permissions("o'neil@example.org")
    assert "{read: ['o''neil@example.org']}" in files[PUB_FILE]
    assert "user: 'o''neil@example.org'" in files[LEGACY_FILE]
