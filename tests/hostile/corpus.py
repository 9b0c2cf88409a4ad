"""A corpus of hostile and broken inbound files, built programmatically.

Each ``Case`` names the file, builds it (bytes, links, FIFOs, folders...) in a
``Scene``, and says which reason code it must be refused with (``None``: it
must be ignored, never read). The same builders run in two harnesses:

- the unit harness (tests/test_hostile.py) feeds each file to
  ``InboundReader.read_inbound`` and, when the edge accepts it, to a real
  ``RoundMachine``, then quarantines it;
- the federation harness (tests/test_hostile_federation.py) drops the files
  into a running job's datasite folders while honest datasites train, and
  checks the aggregated model against hand-computed FedAvg.

Every file is created under a temp name and renamed into place, as a real
writer would: a watcher must never see a half-made hostile file (a sparse
file before its truncate, say), or it would be refused for the wrong reason.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import msgpack
import numpy as np

from fl_orchestrator.config.schema import LimitsSection
from fl_orchestrator.core.reasons import Reason
from fl_orchestrator.wire.frames import encode_bytes
from fl_orchestrator.wire.layout import JobLayout

from support import scripted

JOB = "testjob"
HOSTILE = "ds0@example.org"  # selected; most hostile files land in its results folder
ANSWERED = "ds1@example.org"  # selected; duplicates of its counted answer are forged
ABSENT = "ds3@example.org"  # in the job, never present, so never selected
LINKED = "ds4@example.org"  # in the job; its results folder is a symlink out of the root
STRANGER = "mallory@example.org"  # not in the job at all
DATASITES = tuple(f"ds{i}@example.org" for i in range(5))
HONEST = (0, 1, 2)  # indices of the datasites that train and answer
# The bound on the update norm used by every harness: honest updates of the
# scripted datasites stay well under it (about 12 at most), the forged one
# is about 390.
MAX_UPDATE_NORM = 50.0
# max_file_bytes set: the corpus's tiny model would otherwise refuse every 2 MiB file by size.
LIMITS = LimitsSection(max_update_norm=MAX_UPDATE_NORM, max_file_bytes=64 * 1024**2)
SPARSE_BYTES = 2 * 1024**3 + 1  # over any limit


class Scene(Protocol):
    """What a builder may know about the job and the open round."""

    @property
    def layout(self) -> JobLayout: ...

    @property
    def round(self) -> int: ...

    @property
    def model(self) -> dict[str, np.ndarray]:
        """The global model sent this round."""
        ...

    @property
    def outside(self) -> Path:
        """A scratch folder outside the SyftBox root."""
        ...

    def task_id(self, datasite: str) -> str:
        """This attempt's task id of a selected datasite."""
        ...

    def counted_result(self, datasite: str) -> Path:
        """The datasite's answer already counted in this attempt."""
        ...

    def previous_result(self, datasite: str) -> Path:
        """The datasite's answer counted in the previous round."""
        ...


Stage = Literal["edge", "round", "ignored"]


@dataclass(frozen=True)
class Case:
    """One hostile file: how to make it, and what must become of it."""

    name: str
    reason: Reason | None
    build: Callable[[Scene], Path]
    stage: Stage = "edge"
    moved: bool = True  # moved into quarantine; False: recorded only (or ignored)
    prepare: Callable[[Scene], None] | None = None  # folders to create before the daemon starts
    after_answer: bool = False  # needs ANSWERED's answer to be counted first
    round: int = 1  # federation harness: the round in which the file is dropped
    # Its name cannot be decoded as UTF-8: watchfiles fails on it, the daemon's
    # watcher restarts and the events of that batch are lost (the rescan finds
    # results and heartbeats again, not nested or unknown-datasite files), so
    # the federation harness drops it after every other file was refused.
    restarts_watcher: bool = False
    # Under a folder that is a link: read directly it is refused, but the daemon lists no
    # folder through a link, so it never reads it (the watcher reports the folder once).
    behind_a_link: bool = False


# ---- building blocks ------------------------------------------------------------------


def index_of(datasite: str) -> int:
    """ds3@example.org -> 3."""
    return int(datasite.split("@")[0][2:])


def fresh(case: str) -> str:
    """A task-id-shaped name of its own for each case, so no two files collide."""
    return hashlib.sha256(os.fsencode(case)).hexdigest()[:32]


def honest(scene: Scene, datasite: str = HOSTILE) -> dict[str, np.ndarray]:
    """What that datasite's honest training returns for this round's model."""
    return scripted.scripted_update(scene.model, index_of(datasite))


def header(scene: Scene, reply_to: str, **changes: Any) -> dict[str, Any]:
    """An ok result's header without the manifest; ``DROP`` removes a field."""
    base: dict[str, Any] = {
        "version": 1,
        "kind": "result",
        "job": JOB,
        "round": scene.round,
        "message_id": "a" * 32,
        "reply_to": reply_to,
        "created": 1_700_000_000.0,
        "deadline": None,
        "status": "ok",
        "num_examples": 10,
        "metrics": {"loss": 0.5},
        "error": None,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


DROP: Any = object()


def ok_result(
    scene: Scene, reply_to: str, arrays: dict[str, np.ndarray] | None = None, **changes: Any
) -> bytes:
    """A complete ok result (valid unless ``changes`` or ``arrays`` break it)."""
    return encode_bytes(header(scene, reply_to, **changes), honest(scene) if arrays is None else arrays)


def raw_result(head: dict[str, Any], manifest: list[Any], payloads: list[bytes]) -> bytes:
    """A result with a hand-written manifest and bins: for what the encoder refuses to write."""
    data = msgpack.packb({**head, "arrays": manifest}, use_bin_type=True)
    for payload in payloads:
        data += struct.pack(">BI", 0xC6, len(payload)) + payload
    return data


def place(path: Path, make: Callable[[Path], None]) -> Path:
    """Make the file under a temp name in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    make(temp)
    os.replace(temp, path)
    return path


def put(path: Path, data: bytes) -> Path:
    """Place a regular file holding ``data``."""
    return place(path, lambda temp: temp.write_bytes(data))


def result_path(scene: Scene, name: str, datasite: str = HOSTILE) -> Path:
    """results/<name>.result of a datasite."""
    return scene.layout.results_dir(datasite) / f"{name}.result"


def file_case(name: str, reason: Reason, content: Callable[[Scene, str], bytes], **options: Any) -> Case:
    """A regular file in HOSTILE's results folder, named ``fresh(name)``; content gets that id."""

    def build(scene: Scene) -> Path:
        stem = fresh(name)
        return put(result_path(scene, stem), content(scene, stem))

    return Case(name, reason, build, **options)


def with_array(scene: Scene, name: str, change: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """HOSTILE's honest arrays with one of them changed."""
    arrays = honest(scene)
    arrays[name] = change(arrays[name].copy())
    return arrays


def _set_first(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def change(array: np.ndarray) -> np.ndarray:
        array.reshape(-1)[0] = value
        return array

    return change


# ---- builders that need more than bytes ------------------------------------------------


def _valid_elsewhere(scene: Scene, stem: str, arrays: dict[str, np.ndarray] | None = None) -> Path:
    """A valid-looking result outside the SyftBox root (for links to point at)."""
    target = scene.outside / f"{stem}-target.result"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(ok_result(scene, stem, arrays))
    return target


def _symlink_to_passwd(scene: Scene) -> Path:
    return place(result_path(scene, fresh("symlink_to_etc_passwd")), lambda t: t.symlink_to("/etc/passwd"))


def _symlink_to_valid(scene: Scene) -> Path:
    # Named after HOSTILE's live task and pointing at an answer to it that
    # would be counted if the link were followed: the model check catches that.
    stem = scene.task_id(HOSTILE)
    bigger = {k: v + np.float32(1) for k, v in honest(scene).items()}
    target = _valid_elsewhere(scene, stem, bigger)
    return place(result_path(scene, stem), lambda t: t.symlink_to(target))


def _hard_link(scene: Scene) -> Path:
    stem = fresh("hard_link")
    target = _valid_elsewhere(scene, stem)
    return place(result_path(scene, stem), lambda t: os.link(target, t))


def _fifo(scene: Scene) -> Path:
    return place(result_path(scene, fresh("fifo")), os.mkfifo)


def _directory(scene: Scene) -> Path:
    # Empty: a file inside it would be a file in a folder inside results/ (result_below_results).
    return place(result_path(scene, fresh("directory_named_result")), lambda temp: temp.mkdir())


def _sparse_file(name: str, size: int) -> Callable[[Scene], Path]:
    def build(scene: Scene) -> Path:
        def make(temp: Path) -> None:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.ftruncate(fd, size)  # sparse: no block is written
            finally:
                os.close(fd)

        return place(result_path(scene, fresh(name)), make)

    return build


def _prepare_linked(scene: Scene) -> None:
    app = scene.layout.app_dir(LINKED)
    app.mkdir(parents=True, exist_ok=True)
    target = scene.outside / "linked-results"
    target.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(app / "results"):
        (app / "results").symlink_to(target)


def _symlinked_folder(scene: Scene) -> Path:
    stem = fresh("symlinked_results_folder")
    put(scene.outside / "linked-results" / f"{stem}.result", ok_result(scene, stem))
    return result_path(scene, stem, LINKED)


def _prepare_results(datasite: str, sub: str = "") -> Callable[[Scene], None]:
    def prepare(scene: Scene) -> None:
        (scene.layout.results_dir(datasite) / sub).mkdir(parents=True, exist_ok=True)

    return prepare


def _nested(scene: Scene) -> Path:
    stem = fresh("nested_result")
    return put(scene.layout.results_dir(HOSTILE) / "sub" / f"{stem}.result", ok_result(scene, stem))


def _named(name: str) -> Callable[[Scene], Path]:
    def build(scene: Scene) -> Path:
        return put(scene.layout.results_dir(HOSTILE) / name, ok_result(scene, fresh(name)))

    return build


def _not_selected(scene: Scene) -> Path:
    stem = fresh("not_selected")
    return put(result_path(scene, stem, ABSENT), ok_result(scene, stem))


def _stranger(scene: Scene) -> Path:
    stem = fresh("unknown_datasite")
    return put(result_path(scene, stem, STRANGER), ok_result(scene, stem))


def _heartbeat(datasite: str, data: bytes) -> Callable[[Scene], Path]:
    def build(scene: Scene) -> Path:
        return put(scene.layout.heartbeat_path(datasite), data)

    return build


def _duplicate(scene: Scene) -> Path:
    # The very bytes that were counted, written again: a new file at the same path.
    path = scene.counted_result(ANSWERED)
    return put(path, path.read_bytes())


def _replay(scene: Scene) -> Path:
    path = scene.previous_result(HOSTILE)
    return put(path, path.read_bytes())


def _name_differs(scene: Scene, stem: str) -> bytes:
    return ok_result(scene, scene.task_id(HOSTILE))


def _too_many_arrays(scene: Scene, stem: str) -> bytes:
    count = LIMITS.max_arrays + 1
    manifest = [[f"a{i}", "uint8", [0]] for i in range(count)]
    return raw_result(header(scene, stem), manifest, [b""] * count)


def _bad_dtype(dtype: str) -> Callable[[Scene, str], bytes]:
    def content(scene: Scene, stem: str) -> bytes:
        arrays = honest(scene)
        manifest = [["w", dtype, list(arrays["w"].shape)], ["b", "float32", list(arrays["b"].shape)]]
        return raw_result(header(scene, stem), manifest, [arrays["w"].tobytes(), arrays["b"].tobytes()])

    return content


def _bin_size_mismatch(scene: Scene, stem: str) -> bytes:
    arrays = honest(scene)
    manifest = [["w", "float32", [4, 3]], ["b", "float32", [3]]]
    return raw_result(header(scene, stem), manifest, [arrays["w"].tobytes()[:-4], arrays["b"].tobytes()])


def _manifest(shape: list[int]) -> Callable[[Scene, str], bytes]:
    def content(scene: Scene, stem: str) -> bytes:
        return raw_result(header(scene, stem), [["w", "float32", shape]], [b"\x00" * 4])

    return content


def _truncated(scene: Scene, stem: str) -> bytes:
    data = ok_result(scene, stem)
    return data[: len(data) - 7]  # inside the last bin


def _cut_header(scene: Scene, stem: str) -> bytes:
    return ok_result(scene, stem)[:40]


def _nesting(depth: int) -> Callable[[Scene, str], bytes]:
    # Depth 1000 is within msgpack's C stack (1024): the decoder's own depth
    # check must refuse it (a repr of it in a detail once raised RecursionError).
    # Depth 100 000 overflows the C stack: msgpack refuses it itself.
    def content(scene: Scene, stem: str) -> bytes:
        return b"\x82\xa7version\x01\xa4kind" + b"\x91" * depth + b"\xc0"

    return content


def _oversized_header(scene: Scene, stem: str) -> bytes:
    padding = {f"pad{i}": "x" * 60_000 for i in range(20)}  # 1.2 MB of strings under 64 KiB each
    return ok_result(scene, stem, **padding)


def _error_with_arrays(scene: Scene, stem: str) -> bytes:
    head = header(scene, stem, status="error", num_examples=0, error={"type": "E", "message": "m"})
    return encode_bytes(head, honest(scene))


CORPUS: tuple[Case, ...] = (
    # ---- the file as bytes ----
    file_case("empty_file", Reason.EMPTY_FILE, lambda s, n: b""),
    file_case("truncated_in_a_bin", Reason.TRUNCATED, _truncated),
    file_case("truncated_in_the_header", Reason.TRUNCATED, _cut_header),
    file_case("random_bytes", Reason.MALFORMED, lambda s, n: random.Random(7).randbytes(4096)),
    file_case("not_a_map", Reason.MALFORMED, lambda s, n: msgpack.packb([1, 2, 3])),
    file_case("nesting_bomb_1000", Reason.MALFORMED, _nesting(1000)),
    file_case("nesting_bomb_100000", Reason.MALFORMED, _nesting(100_000)),
    file_case("str_length_bomb", Reason.TRUNCATED, lambda s, n: b"\x81\xa3job\xdb" + b"\xff" * 4 + b"x" * 64),
    file_case("bin_length_bomb", Reason.TRUNCATED, lambda s, n: b"\x81\xa3job\xc6" + b"\xff" * 4 + b"x" * 64),
    file_case(
        "array_length_bomb", Reason.MALFORMED, lambda s, n: b"\x81\xa1x\xdd\xff\xff\xff\xff" + b"\xc0" * 64
    ),
    file_case("map_length_bomb", Reason.MALFORMED, lambda s, n: b"\xdf\xff\xff\xff\xff" + b"\xc0" * 64),
    file_case(
        "payload_length_bomb",
        Reason.TRUNCATED,
        lambda s, n: (
            encode_bytes(header(s, n, arrays=[["w", "float32", [4, 3]]]))
            + b"\xc6\xff\xff\xff\xff"
            + b"\x00" * 48
        ),
    ),
    file_case(
        "string_over_limit", Reason.MALFORMED, lambda s, n: ok_result(s, n, metrics={"m" * 100_000: 1.0})
    ),
    file_case(
        "ext_type", Reason.MALFORMED, lambda s, n: ok_result(s, n, created=msgpack.ExtType(1, b"\x00"))
    ),
    file_case("oversized_header", Reason.HEADER_TOO_LARGE, _oversized_header),
    file_case("trailing_bytes", Reason.TRAILING_BYTES, lambda s, n: ok_result(s, n) + b"\x00"),
    # Over the model's size: refused from fstat before anything else.
    Case("sparse_2gib", Reason.FILE_TOO_LARGE, _sparse_file("sparse_2gib", SPARSE_BYTES)),
    # Within max_file_bytes, but mostly holes: refused before it is read.
    Case("sparse_under_limit", Reason.SPARSE_FILE, _sparse_file("sparse_under_limit", 2 * 1024**2)),
    # ---- the header ----
    file_case("unsupported_version", Reason.UNSUPPORTED_VERSION, lambda s, n: ok_result(s, n, version=2)),
    file_case("wrong_kind", Reason.WRONG_KIND, lambda s, n: ok_result(s, n, kind="model")),
    file_case("forged_sender", Reason.UNEXPECTED_FIELD, lambda s, n: ok_result(s, n, sender=ANSWERED)),
    file_case("missing_field", Reason.MISSING_FIELD, lambda s, n: ok_result(s, n, metrics=DROP)),
    file_case("bad_status", Reason.BAD_FIELD, lambda s, n: ok_result(s, n, status="maybe")),
    file_case("error_result_with_arrays", Reason.BAD_FIELD, _error_with_arrays),
    file_case("wrong_job", Reason.WRONG_JOB, lambda s, n: ok_result(s, n, job="other-job")),
    # ---- the arrays, against the global model ----
    file_case("object_dtype", Reason.DTYPE_MISMATCH, _bad_dtype("object")),
    file_case("complex_dtype", Reason.DTYPE_MISMATCH, _bad_dtype("complex64")),
    file_case(
        "int_where_float",
        Reason.DTYPE_MISMATCH,
        lambda s, n: ok_result(s, n, with_array(s, "w", lambda a: a.astype(np.int32))),
    ),
    file_case(
        "float64_where_float32",
        Reason.DTYPE_MISMATCH,
        lambda s, n: ok_result(s, n, with_array(s, "w", lambda a: a.astype(np.float64))),
    ),
    file_case(
        "wrong_shape",
        Reason.SHAPE_MISMATCH,
        lambda s, n: ok_result(s, n, with_array(s, "w", lambda a: a.reshape(3, 4))),
    ),
    file_case(
        "missing_array", Reason.ARRAY_NAMES_MISMATCH, lambda s, n: ok_result(s, n, {"w": honest(s)["w"]})
    ),
    file_case(
        "extra_array",
        Reason.ARRAY_NAMES_MISMATCH,
        lambda s, n: ok_result(s, n, {**honest(s), "bonus": np.zeros(2, np.float32)}),
    ),
    file_case("bin_size_mismatch", Reason.BAD_ARRAY_MANIFEST, _bin_size_mismatch),
    file_case("too_many_arrays", Reason.BAD_ARRAY_MANIFEST, _too_many_arrays),
    file_case("too_many_dims", Reason.BAD_ARRAY_MANIFEST, _manifest([1] * (LIMITS.max_array_dims + 1))),
    file_case("huge_declared_shape", Reason.BAD_ARRAY_MANIFEST, _manifest([2**40])),
    file_case(
        "nan", Reason.NON_FINITE, lambda s, n: ok_result(s, n, with_array(s, "w", _set_first(float("nan"))))
    ),
    file_case(
        "inf", Reason.NON_FINITE, lambda s, n: ok_result(s, n, with_array(s, "b", _set_first(float("-inf"))))
    ),
    file_case(
        "num_examples_huge", Reason.BAD_NUM_EXAMPLES, lambda s, n: ok_result(s, n, num_examples=10**13)
    ),
    file_case(
        "num_examples_negative", Reason.BAD_NUM_EXAMPLES, lambda s, n: ok_result(s, n, num_examples=-5)
    ),
    file_case("num_examples_zero", Reason.BAD_NUM_EXAMPLES, lambda s, n: ok_result(s, n, num_examples=0)),
    file_case("num_examples_bool", Reason.BAD_NUM_EXAMPLES, lambda s, n: ok_result(s, n, num_examples=True)),
    file_case("num_examples_float", Reason.BAD_NUM_EXAMPLES, lambda s, n: ok_result(s, n, num_examples=10.0)),
    file_case(
        "too_many_metrics",
        Reason.BAD_METRICS,
        lambda s, n: ok_result(s, n, metrics={f"m{i}": 1.0 for i in range(LIMITS.max_metrics + 1)}),
    ),
    file_case(
        "non_numeric_metric", Reason.BAD_METRICS, lambda s, n: ok_result(s, n, metrics={"loss": "low"})
    ),
    file_case("nan_metric", Reason.BAD_METRICS, lambda s, n: ok_result(s, n, metrics={"loss": float("nan")})),
    file_case(
        "norm_exceeded",
        Reason.NORM_EXCEEDED,
        lambda s, n: ok_result(s, n, {k: v + np.float32(100) for k, v in honest(s).items()}),
    ),
    # ---- against the round ----
    file_case("name_differs_from_reply_to", Reason.REPLY_TO_MISMATCH, _name_differs),
    file_case(
        "reply_to_not_this_task", Reason.REPLY_TO_MISMATCH, lambda s, n: ok_result(s, n), stage="round"
    ),
    file_case(
        "future_round", Reason.UNKNOWN_ROUND, lambda s, n: ok_result(s, n, round=s.round + 5), stage="round"
    ),
    Case("duplicate", Reason.DUPLICATE, _duplicate, stage="round", after_answer=True),
    Case("replay_of_an_old_round", Reason.ROUND_CLOSED, _replay, stage="round", round=2),
    Case("not_selected", Reason.NOT_SELECTED, _not_selected, stage="round", prepare=_prepare_results(ABSENT)),
    Case(
        "unknown_datasite",
        Reason.UNKNOWN_DATASITE,
        _stranger,
        moved=False,
        prepare=_prepare_results(STRANGER),
    ),
    # ---- the filesystem ----
    Case("symlink_to_etc_passwd", Reason.SYMLINK, _symlink_to_passwd),
    Case("symlink_to_a_valid_answer", Reason.SYMLINK, _symlink_to_valid),
    Case(
        "symlinked_results_folder",
        Reason.SYMLINK,
        _symlinked_folder,
        moved=False,
        prepare=_prepare_linked,
        behind_a_link=True,
    ),
    Case("hard_link", Reason.HARD_LINK, _hard_link),
    Case("fifo", Reason.NOT_REGULAR_FILE, _fifo),
    Case("directory_named_result", Reason.NOT_REGULAR_FILE, _directory, moved=False),
    Case("name_with_dotdot", Reason.BAD_NAME, _named("ab..cd.result")),
    Case("name_with_backslash", Reason.BAD_NAME, _named("ab\\cd.result")),
    Case("name_too_long", Reason.BAD_NAME, _named("a" * 65 + ".result")),
    Case("name_not_utf8", Reason.BAD_NAME, _named(os.fsdecode(b"ab\xffcd.result")), restarts_watcher=True),
    Case("result_below_results", Reason.BAD_NAME, _nested, prepare=_prepare_results(HOSTILE, "sub")),
    Case(
        "heartbeat_garbage",
        Reason.MALFORMED,
        _heartbeat(ABSENT, b"\xc1 not a heartbeat"),
        prepare=_prepare_results(ABSENT),
    ),
    Case(
        "heartbeat_too_large",
        Reason.FILE_TOO_LARGE,
        _heartbeat(LINKED, b"\x00" * (64 * 1024 + 1)),
        prepare=_prepare_linked,
    ),
    # ---- never read at all ----
    Case("temp_name", None, _named(".abc.result.0123456789ab.tmp"), stage="ignored", moved=False),
    Case("dot_name", None, _named(".hidden.result"), stage="ignored", moved=False),
)

REFUSED = tuple(case for case in CORPUS if case.reason is not None)
# What a running daemon refuses: it never lists a folder through a link.
REFUSED_BY_DAEMON = tuple(case for case in REFUSED if not case.behind_a_link)
