"""The byte layout of a message file: a msgpack header, then one bin per array.

A file is a msgpack *stream*: the first object is the header map, and each
entry of its ``arrays`` manifest is followed, in order, by one msgpack bin
holding that array's raw little-endian C-order bytes. Any msgpack library can
read it; this module reads it without copying the array payloads: each array
is an ``np.frombuffer`` view over the buffer the caller read the file into.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from fl_orchestrator.core.reasons import Reason, Rejection, describe

Weights = dict[str, np.ndarray]

# Names on the wire, always little-endian; nothing that needs an object dtype.
WIRE_DTYPES: Mapping[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    )
}
_BIN32 = struct.Struct(">BI")
_MAX_BIN32 = 2**32 - 1


@dataclass(frozen=True)
class FrameLimits:
    """Bounds checked before anything large is allocated.

    The msgpack limits apply to the header only (the array payloads are parsed
    by hand). ``max_container_len`` bounds every msgpack array and map; the
    manifest list may still hold ``max_arrays + 1`` entries and a map
    ``max_map_entries + 1``, so that one too many is refused by the check that
    names it (``bad_array_manifest``, ``bad_metrics``) instead of as ``malformed``.
    ``max_str_len`` bounds each str and bin in the header (None: the header
    limit). ``max_depth`` bounds nesting: msgpack's C unpacker stops at 1024
    levels by itself, but anything past a few hundred can still make a
    recursive repr of a decoded value fail, and no message nests deeper than 4.
    """

    max_header_bytes: int = 1024 * 1024
    max_arrays: int = 4096
    max_ndim: int = 8
    max_elements: int = 2**31
    max_container_len: int = 4096
    max_map_entries: int = 0
    max_str_len: int | None = None
    max_depth: int = 32


def wire_dtype_name(dtype: np.dtype[Any]) -> str:
    """The wire name of a numpy dtype, or raise ValueError for one the wire cannot carry."""
    name = np.dtype(dtype).name
    if name not in WIRE_DTYPES:
        raise ValueError(f"dtype {name} cannot be sent; use one of {', '.join(WIRE_DTYPES)}")
    return name


def encode_frames(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None) -> list[Any]:
    """Encode a header and arrays as a list of buffers to write in order.

    The arrays are not copied unless they are non-contiguous or big-endian, so
    writing a large model costs one pass over its bytes.
    """
    full = dict(header)
    chunks: list[Any] = []
    payloads: list[memoryview] = []
    if arrays is not None:
        manifest = []
        for name, array in arrays.items():
            dtype_name = wire_dtype_name(array.dtype)
            # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
            wire = np.asarray(array, dtype=WIRE_DTYPES[dtype_name], order="C")
            if wire.nbytes > _MAX_BIN32:
                raise ValueError(f"array {name} is {wire.nbytes} bytes; the limit is 4 GiB - 1")
            manifest.append([name, dtype_name, list(wire.shape)])
            payloads.append(memoryview(wire.reshape(-1).view(np.uint8).data))
        full["arrays"] = manifest
    chunks.append(msgpack.packb(full, use_bin_type=True))
    for payload in payloads:
        chunks.append(_BIN32.pack(0xC6, payload.nbytes))
        chunks.append(payload)
    return chunks


def encode_bytes(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    """Encode to one bytes object (small messages and tests)."""
    return b"".join(bytes(c) for c in encode_frames(header, arrays))


# What a msgpack map can start with: fixmap (0x80-0x8f), map 16, map 32; and a str.
_MAP_FIRST_BYTES = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_STR_FIRST_BYTES = frozenset(range(0xA0, 0xC0)) | {0xD9, 0xDA, 0xDB}


def _check_start(view: memoryview, first_keys: frozenset[str] | None) -> None:
    """Refuse, from its first bytes, a cut-short file that cannot be the start of a header map.

    A file still being written starts as a whole one does, so this junk need
    not wait out the settle time that a header cut short is given
    (``truncated``): the first byte must open a map and, if the map has
    entries, its first key must be a string, and one of ``first_keys`` if
    given (the fields of any message; a header with another field is refused
    anyway).
    """
    first = view[0]
    if first not in _MAP_FIRST_BYTES:
        raise Rejection(Reason.MALFORMED, f"not a message: it starts with byte 0x{first:02x}, not a map")
    count_bytes = {0xDE: 2, 0xDF: 4}.get(first, 0)
    if view.nbytes <= 1 + count_bytes:
        return  # too short to say more: maybe still arriving
    entries = first & 0x0F if count_bytes == 0 else int.from_bytes(view[1 : 1 + count_bytes], "big")
    key = view[1 + count_bytes]
    if entries and key not in _STR_FIRST_BYTES:
        raise Rejection(
            Reason.MALFORMED, f"not a message: its first key starts with byte 0x{key:02x}, not a str"
        )
    if entries and first_keys is not None:
        _check_first_key(view[1 + count_bytes :], first_keys)


def _check_first_key(view: memoryview, first_keys: frozenset[str]) -> None:
    """A first key that is whole, or declares more bytes than any field name, must be a field."""
    marker = view[0]
    size_bytes = {0xD9: 1, 0xDA: 2, 0xDB: 4}.get(marker, 0)
    if view.nbytes <= size_bytes:
        return
    length = marker & 0x1F if size_bytes == 0 else int.from_bytes(view[1 : 1 + size_bytes], "big")
    if length > max(len(key) for key in first_keys):
        raise Rejection(Reason.MALFORMED, f"not a message: its first key is {length} bytes long")
    name = bytes(view[1 + size_bytes : 1 + size_bytes + length])
    if len(name) == length and name.decode("utf-8", "replace") not in first_keys:
        raise Rejection(Reason.MALFORMED, f"not a message: its first key {describe(name)} is no field")


def decode_header(
    buffer: bytes | bytearray | memoryview, limits: FrameLimits, *, first_keys: frozenset[str] | None = None
) -> tuple[dict[str, Any], int]:
    """Decode the header map; return it and the offset where the array bins start.

    ``first_keys``: the names a header's fields may have, if known.
    """
    view = memoryview(buffer)
    if view.nbytes == 0:
        raise Rejection(Reason.EMPTY_FILE, "the file is empty")
    max_str = limits.max_header_bytes if limits.max_str_len is None else limits.max_str_len
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_buffer_size=limits.max_header_bytes,
        max_str_len=max_str,
        max_bin_len=max_str,
        max_array_len=max(limits.max_container_len, limits.max_arrays + 1),
        max_map_len=max(limits.max_container_len, limits.max_map_entries + 1),
        max_ext_len=0,
    )
    unpacker.feed(view[: limits.max_header_bytes])
    try:
        header = unpacker.unpack()
    except msgpack.OutOfData:
        if view.nbytes > limits.max_header_bytes:
            raise Rejection(
                Reason.HEADER_TOO_LARGE, f"no header within {limits.max_header_bytes} bytes"
            ) from None
        _check_start(view, first_keys)  # junk is malformed now, not held as maybe still arriving
        raise Rejection(Reason.TRUNCATED, "the header ends before it is complete") from None
    except Exception as exc:  # msgpack raises many types for hostile input
        raise Rejection(Reason.MALFORMED, f"not msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise Rejection(Reason.MALFORMED, f"the first object is a {type(header).__name__}, not a map")
    _check_depth(header, limits.max_depth)
    return header, unpacker.tell()


def _check_depth(root: dict[str, Any], max_depth: int) -> None:
    """Refuse a header nesting maps and arrays deeper than ``max_depth`` levels.

    Iterative, and it looks only inside containers, so it costs one pass over
    the header's items (bounded by max_header_bytes) and never recurses.
    """
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        container, depth = stack.pop()
        items = container.values() if isinstance(container, dict) else container
        for item in items:
            if isinstance(item, (dict, list)):
                if depth + 1 > max_depth:
                    raise Rejection(Reason.MALFORMED, f"the header nests deeper than {max_depth} levels")
                stack.append((item, depth + 1))


def decode_arrays(
    buffer: bytes | bytearray | memoryview, offset: int, manifest: object, limits: FrameLimits
) -> Weights:
    """View the bins after the header as arrays, checking the manifest against the bytes."""
    view = memoryview(buffer)
    if not isinstance(manifest, list):
        raise Rejection(Reason.BAD_ARRAY_MANIFEST, "arrays is not a list")
    if len(manifest) > limits.max_arrays:
        raise Rejection(
            Reason.BAD_ARRAY_MANIFEST, f"{len(manifest)} arrays; the limit is {limits.max_arrays}"
        )
    arrays: Weights = {}
    for index, entry in enumerate(manifest):
        name, dtype, shape = _manifest_entry(index, entry, limits)
        if name in arrays:
            raise Rejection(Reason.BAD_ARRAY_MANIFEST, f"array {name!r} appears twice")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = count * dtype.itemsize
        start, length = _bin_at(view, offset, name)
        if length != nbytes:
            raise Rejection(
                Reason.BAD_ARRAY_MANIFEST,
                f"array {name!r} declares {nbytes} bytes but its bin holds {length}",
            )
        arrays[name] = np.frombuffer(view, dtype=dtype, count=count, offset=start).reshape(shape)
        offset = start + length
    if offset != view.nbytes:
        raise Rejection(Reason.TRAILING_BYTES, f"{view.nbytes - offset} bytes after the last array")
    return arrays


def _manifest_entry(
    index: int, entry: object, limits: FrameLimits
) -> tuple[str, np.dtype[Any], tuple[int, ...]]:
    if not (isinstance(entry, list) and len(entry) == 3):
        raise Rejection(Reason.BAD_ARRAY_MANIFEST, f"arrays[{index}] is not [name, dtype, shape]")
    name, dtype_name, shape = entry
    if not isinstance(name, str) or not name or len(name) > 256:
        raise Rejection(Reason.BAD_ARRAY_MANIFEST, f"arrays[{index}] has a bad name")
    if not isinstance(dtype_name, str) or dtype_name not in WIRE_DTYPES:
        raise Rejection(Reason.DTYPE_MISMATCH, f"array {name!r} has dtype {describe(dtype_name)}")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise Rejection(Reason.BAD_ARRAY_MANIFEST, f"array {name!r} has a bad shape")
    dims: list[int] = []
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise Rejection(Reason.BAD_ARRAY_MANIFEST, f"array {name!r} has shape {shape!r}")
        dims.append(dim)
    # Zero dims are skipped: numpy refuses a shape like (0, 2**62) even though it holds nothing.
    elements = 1
    for dim in dims:
        elements *= max(dim, 1)
    if elements > limits.max_elements:
        raise Rejection(
            Reason.BAD_ARRAY_MANIFEST,
            f"array {name!r} has shape {dims}; limit {limits.max_elements} elements",
        )
    return name, WIRE_DTYPES[dtype_name], tuple(dims)


def _bin_at(view: memoryview, offset: int, name: str) -> tuple[int, int]:
    """Parse one msgpack bin header by hand: the library would copy the payload."""
    if offset >= view.nbytes:
        raise Rejection(Reason.TRUNCATED, f"the file ends before array {name!r}")
    marker = view[offset]
    width = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(marker)
    if width is None:
        raise Rejection(Reason.MALFORMED, f"array {name!r} is not a msgpack bin (0x{marker:02x})")
    if offset + 1 + width > view.nbytes:
        raise Rejection(Reason.TRUNCATED, f"the file ends inside array {name!r}'s header")
    length = int.from_bytes(view[offset + 1 : offset + 1 + width], "big")
    start = offset + 1 + width
    if start + length > view.nbytes:
        raise Rejection(
            Reason.TRUNCATED, f"array {name!r} needs {length} bytes; {view.nbytes - start} remain"
        )
    return start, length
