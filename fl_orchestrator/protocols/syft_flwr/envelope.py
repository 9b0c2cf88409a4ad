"""syft-rpc's JSON envelope around a request or a response (no Flower here).

A request is one compact JSON object: id, sender, url, body, headers, created,
expires, method; a response has status_code instead of method. ``body`` is
URL-safe base64 with padding (how pydantic writes bytes); both base64
alphabets are accepted when reading, as syft-rpc does.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# syft-flwr's aggregator node id ("what the SuperLink's node does").
AGGREGATOR_NODE_ID = 1


def node_id_of(email: str) -> int:
    """A data owner's Flower node id, as syft-flwr computes it: crc32 of the email."""
    return zlib.crc32(email.encode())


class EnvelopeError(Exception):
    """A response that is not (yet) a valid envelope.

    ``complete`` is False when the bytes could be a file still being written
    (empty, or JSON cut short): the caller should look again later.
    """

    def __init__(self, detail: str, *, complete: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.complete = complete


@dataclass(frozen=True)
class Response:
    """A decoded response envelope."""

    id: uuid.UUID
    sender: str
    status_code: int
    body: bytes | None
    expires: datetime | None


def message_file_bound(array_bytes: list[int], *, encrypted: bool) -> int:
    """The largest request or reply file that carries arrays of these sizes, whole.

    A Flower message holds each array with a small header (1 KiB allowed each);
    syft-rpc's JSON carries the body in base64 (4/3). Encrypted, the message is
    base64 inside the ciphertext, which is base64 inside the payload: (4/3)^3.
    1 MiB more covers the config, the metrics and the envelope.
    """
    payload = sum(size + 1024 for size in array_bytes)
    grown = payload * 64 // 27 if encrypted else payload * 4 // 3
    return grown + 1024 * 1024


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat()


def encode_request(
    *,
    request_id: uuid.UUID,
    sender: str,
    url: str,
    body: bytes,
    created: float,
    expires: float,
    method: str = "GET",
) -> list[bytes]:
    """A request file's bytes, as chunks (the body is not copied into a second JSON string)."""
    head = json.dumps({"id": str(request_id), "sender": sender, "url": url}, separators=(",", ":"))[:-1]
    tail = json.dumps(
        {"headers": {}, "created": _iso(created), "expires": _iso(expires), "method": method},
        separators=(",", ":"),
    )[1:]
    return [
        head.encode() + b',"body":"',
        base64.urlsafe_b64encode(body),
        b'",' + tail.encode(),
    ]


def decode_response(data: bytes | bytearray | memoryview) -> Response:
    """Parse a response file; raise EnvelopeError saying whether it may still be arriving."""
    raw = bytes(data)
    if not raw.strip():
        raise EnvelopeError("the file is empty", complete=False)
    try:
        document = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"not UTF-8 JSON: {exc}", complete=True) from None
    except RecursionError:
        raise EnvelopeError("JSON nested too deeply", complete=True) from None
    except json.JSONDecodeError as exc:
        # Being filled: it does not end its object yet, or fails at its very end. Whatever
        # else looks complete is broken for good (and the settle time bounds a wrong guess).
        text = raw.rstrip()
        cut_short = not text.endswith(b"}") or exc.pos >= len(text)
        raise EnvelopeError(f"not JSON: {exc.msg} at byte {exc.pos}", complete=not cut_short) from None
    except ValueError as exc:  # e.g. an integer too long to convert
        raise EnvelopeError(f"not JSON: {exc}", complete=True) from None
    if not isinstance(document, dict):
        raise EnvelopeError(f"a JSON {type(document).__name__}, not an object", complete=True)
    return Response(
        id=_field(document, "id", _uuid),
        sender=_field(document, "sender", _str),
        status_code=_field(document, "status_code", _status, default=200),
        body=_field(document, "body", _body, default=None),
        expires=_field(document, "expires", _datetime, default=None),
    )


_NO_DEFAULT: Any = object()


def _field(document: dict[str, Any], key: str, parse: Any, default: Any = _NO_DEFAULT) -> Any:
    if key not in document:
        if default is _NO_DEFAULT:
            raise EnvelopeError(f"no {key!r} field", complete=True)
        return default
    try:
        return parse(document[key])
    except (TypeError, ValueError) as exc:
        raise EnvelopeError(f"field {key!r}: {exc}", complete=True) from None


def _uuid(value: object) -> uuid.UUID:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return uuid.UUID(value)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _status(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise ValueError(f"expected an HTTP status code, got {value!r}")
    return value


def _body(value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"expected base64 text, got {type(value).__name__}")
    try:
        return base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not base64: {exc}") from None


def _datetime(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"expected an ISO 8601 time, got {type(value).__name__}")
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
