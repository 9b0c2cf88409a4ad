"""Reason codes for every inbound file the daemon refuses.

The list is part of the operator interface (docs/PROTOCOL.md mirrors it): log
queries and dashboards key on these strings, so they never change meaning.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a file was not used."""

    # The file as bytes
    EMPTY_FILE = "empty_file"
    FILE_TOO_LARGE = "file_too_large"
    UNREADABLE = "unreadable"
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
    BAD_NUM_EXAMPLES = "bad_num_examples"
    BAD_METRICS = "bad_metrics"
    # Against the round
    UNKNOWN_DATASITE = "unknown_datasite"
    ROUND_CLOSED = "round_closed"
    UNKNOWN_ROUND = "unknown_round"
    NOT_SELECTED = "not_selected"
    REPLY_TO_MISMATCH = "reply_to_mismatch"
    DUPLICATE = "duplicate"
    # The filesystem
    SYMLINK = "symlink"
    NOT_REGULAR_FILE = "not_regular_file"
    HARD_LINK = "hard_link"
    BAD_NAME = "bad_name"


class Rejection(Exception):
    """A typed refusal of one inbound file; raised only inside the decoding edge."""

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")
