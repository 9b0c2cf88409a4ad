"""Reason codes for every inbound file the daemon refuses.

The list is part of the operator interface (docs/PROTOCOL.md and
docs/REJECTIONS.md mirror it): log queries and dashboards key on these
strings, so they never change meaning. New codes may be added.
"""

from __future__ import annotations

from enum import StrEnum

# A detail is one log field. It quotes what a hostile sender wrote, so it is
# bounded and made printable: no megabyte strings, no terminal escapes or
# newlines in console logs, no lone surrogates that a UTF-8 stream refuses.
MAX_DETAIL_CHARS = 300


class Reason(StrEnum):
    """Why a file was not used."""

    # The file as bytes
    EMPTY_FILE = "empty_file"
    FILE_TOO_LARGE = "file_too_large"
    SPARSE_FILE = "sparse_file"
    UNREADABLE = "unreadable"
    # Deleted or renamed between its event and the read: never quarantined, looked at again
    # if it comes back (a sync client replacing a file does this all the time).
    VANISHED = "vanished"
    MALFORMED = "malformed"
    HEADER_TOO_LARGE = "header_too_large"
    TRUNCATED = "truncated"
    TRAILING_BYTES = "trailing_bytes"
    # The header
    UNSUPPORTED_VERSION = "unsupported_version"
    WRONG_KIND = "wrong_kind"
    MISSING_FIELD = "missing_field"
    UNEXPECTED_FIELD = "unexpected_field"
    BAD_FIELD = "bad_field"
    WRONG_JOB = "wrong_job"
    # The arrays
    BAD_ARRAY_MANIFEST = "bad_array_manifest"
    ARRAY_NAMES_MISMATCH = "array_names_mismatch"
    DTYPE_MISMATCH = "dtype_mismatch"
    SHAPE_MISMATCH = "shape_mismatch"
    NON_FINITE = "non_finite"
    OVERFLOW = "overflow"
    BAD_NUM_EXAMPLES = "bad_num_examples"
    BAD_METRICS = "bad_metrics"
    NORM_EXCEEDED = "norm_exceeded"
    # Against the round
    UNKNOWN_DATASITE = "unknown_datasite"
    ROUND_CLOSED = "round_closed"
    UNKNOWN_ROUND = "unknown_round"
    NOT_SELECTED = "not_selected"
    REPLY_TO_MISMATCH = "reply_to_mismatch"
    DUPLICATE = "duplicate"
    NORM_OUTLIER = "norm_outlier"
    NUM_EXAMPLES_JUMP = "num_examples_jump"
    # A counted result whose file no longer holds the bytes validated when it was counted.
    CHANGED_AFTER_COUNT = "changed_after_count"
    # Encrypted syft-flwr mode
    # An owner with no published keys (did.json): no request can be encrypted for it.
    NO_PUBLIC_KEY = "no_public_key"
    UNDECRYPTABLE = "undecryptable"
    # The filesystem
    SYMLINK = "symlink"
    NOT_REGULAR_FILE = "not_regular_file"
    HARD_LINK = "hard_link"
    BAD_NAME = "bad_name"
    # Folders the watcher found where no folder belongs (reported, never refused as files)
    UNLISTED_FOLDER = "unlisted_folder"
    SUBFOLDER = "subfolder"
    # The daemon itself
    INTERNAL_ERROR = "internal_error"


def printable(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """``text`` cut to ``limit`` characters with every unprintable character escaped."""
    if len(text) <= limit and text.isprintable():
        return text  # the common case, without a generator step per character
    cut = text[: limit + 1]
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in cut)
    if len(shown) > limit or len(text) > limit:
        shown = shown[: limit - 3] + "..."
    return shown


def describe(value: object, limit: int = 60) -> str:
    """A short, safe rendering of a decoded value for a rejection detail.

    Containers are summarised rather than repr'd: a hostile header may hold a
    list of a million items, and repr of anything nested deeply recurses.
    """
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"a map of {len(value)}"
    if isinstance(value, (str, bytes, bytearray)):
        shown = repr(value[:limit])
        return shown + ("..." if len(value) > limit else "")
    if value is None or isinstance(value, (bool, int, float)):
        return printable(repr(value), limit)
    return type(value).__name__


class Rejection(Exception):
    """A typed refusal of one inbound file; raised only inside the decoding edge."""

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = printable(detail)
        super().__init__(f"{reason}: {self.detail}")
