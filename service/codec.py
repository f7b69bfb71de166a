"""The versioned, safe format of every value this service writes to memcached.

memcached is shared: another app, an older release of ours, or an attacker who can reach
port 11211 may have written the bytes we read. So a value is data, never code: it is
decoded as JSON (orjson) or as raw bytes, never unpickled, and anything that does not
start with our header is refused with :class:`~service.errors.CodecError`, which callers
treat as a miss.

Layout: ``MAGIC (3 bytes) | VERSION (1 byte) | KIND (1 byte) | payload``.

=====  =====================================================================
kind   payload
=====  =====================================================================
``b``  raw bytes
``s``  UTF-8 text
``j``  JSON that decodes to the value as it is
``t``  JSON with tags for what JSON cannot say: bytes, tuples, dicts whose
       keys are not text, big integers, non-finite floats, Flask responses
``c``  a chunk manifest (see :mod:`service.store`): the value is split over items
=====  =====================================================================

A new layout gets a new VERSION; a reader that sees a version it does not know treats the
value as a miss, so a rolling deploy never misreads an item written by the other release.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import orjson
from flask import Response

from .errors import CodecError

MAGIC = b"\x00sw"
VERSION = 1
HEADER_LEN = len(MAGIC) + 2
_HEADER = MAGIC + bytes([VERSION])

KIND_BYTES = b"b"
KIND_TEXT = b"s"
KIND_JSON = b"j"
KIND_TAGGED = b"t"
KIND_CHUNKED = b"c"

# Tags are single-key objects whose key starts with NUL, which no JSON produced by a
# sane program uses; a real dict that happens to look like a tag is itself wrapped.
_T_BYTES, _T_TUPLE, _T_DICT, _T_INT, _T_FLOAT, _T_RESPONSE = (
    "\x00b", "\x00t", "\x00d", "\x00i", "\x00f", "\x00r",
)
_INT_LIMIT = 2**63


def header(kind: bytes) -> bytes:
    return _HEADER + kind


def encode(value: Any) -> bytes:
    """Encode a value: bytes, text, JSON-like data, tuples, or a Flask response.

    :raises CodecError: the value holds something the format cannot represent (the
        message names its type); the caller decides whether to skip caching it.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return header(KIND_BYTES) + bytes(value)
    if isinstance(value, str):
        return header(KIND_TEXT) + value.encode("utf-8", "surrogatepass")
    tagged = [False]
    tree = _tag(value, tagged)
    try:
        payload = orjson.dumps(tree)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise CodecError(f"cannot encode {type(value).__name__}: {exc}") from exc
    return header(KIND_TAGGED if tagged[0] else KIND_JSON) + payload


def kind_of(data: bytes) -> bytes:
    """The kind byte of an encoded value.

    :raises CodecError: not our magic, or a format version this release does not read.
    """
    if len(data) < HEADER_LEN or not data.startswith(MAGIC):
        raise CodecError("not written by this service (bad magic)")
    if data[len(MAGIC)] != VERSION:
        raise CodecError(f"format version {data[len(MAGIC)]} is not {VERSION}")
    return data[HEADER_LEN - 1 : HEADER_LEN]


def decode(data: bytes) -> Any:
    """Decode what :func:`encode` wrote.

    :raises CodecError: garbage, another program's bytes (a pickle, say), an unknown
        version or kind, or a chunk manifest (which :mod:`service.store` resolves first).
    """
    kind = kind_of(data)
    payload = memoryview(data)[HEADER_LEN:]
    try:
        if kind == KIND_BYTES:
            return bytes(payload)
        if kind == KIND_TEXT:
            return bytes(payload).decode("utf-8", "surrogatepass")
        if kind == KIND_JSON:
            return orjson.loads(payload)
        if kind == KIND_TAGGED:
            return _untag(orjson.loads(payload))
    except (orjson.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        raise CodecError(f"corrupt {kind.decode('ascii', 'replace')!r} value: {exc}") from exc
    raise CodecError(f"unknown kind {kind!r}")


def _tag(v: Any, tagged: list[bool]) -> Any:
    if v is None or v is True or v is False or type(v) is str:
        return v
    if isinstance(v, int):
        if -_INT_LIMIT <= v < _INT_LIMIT:
            return int(v)
        tagged[0] = True
        return {_T_INT: str(int(v))}
    if isinstance(v, float):
        if math.isfinite(v):
            return v
        tagged[0] = True
        return {_T_FLOAT: repr(v)}
    if isinstance(v, str):
        return str(v)
    if isinstance(v, list):
        return [_tag(x, tagged) for x in v]
    if isinstance(v, dict):
        if all(type(k) is str for k in v) and not (len(v) == 1 and next(iter(v))[:1] == "\x00"):
            return {k: _tag(x, tagged) for k, x in v.items()}
        tagged[0] = True
        return {_T_DICT: [[_tag(k, tagged), _tag(x, tagged)] for k, x in v.items()]}
    tagged[0] = True
    if isinstance(v, tuple):
        return {_T_TUPLE: [_tag(x, tagged) for x in v]}
    if isinstance(v, bytes | bytearray | memoryview):
        return {_T_BYTES: base64.b64encode(bytes(v)).decode("ascii")}
    if isinstance(v, Response):
        if v.is_streamed:
            raise CodecError("cannot encode a streamed response")
        return {_T_RESPONSE: {
            "status": v.status_code,
            "headers": [[k, x] for k, x in v.headers.items()],
            "body": base64.b64encode(v.get_data()).decode("ascii"),
        }}
    raise CodecError(f"cannot encode a value of type {type(v).__name__}")


def _untag(v: Any) -> Any:
    if isinstance(v, list):
        return [_untag(x) for x in v]
    if not isinstance(v, dict):
        return v
    if len(v) == 1:
        (tag, inner), = v.items()
        if tag[:1] == "\x00":
            return _untag_one(tag, inner)
    return {k: _untag(x) for k, x in v.items()}


def _untag_one(tag: str, inner: Any) -> Any:
    if tag == _T_TUPLE:
        return tuple(_untag(x) for x in inner)
    if tag == _T_BYTES:
        return base64.b64decode(inner, validate=True)
    if tag == _T_DICT:
        return {_hashable(_untag(k)): _untag(x) for k, x in inner}
    if tag == _T_INT:
        return int(inner)
    if tag == _T_FLOAT:
        return float(inner)
    if tag == _T_RESPONSE:
        response = Response(base64.b64decode(inner["body"], validate=True), inner["status"])
        response.headers.clear()
        for k, x in inner["headers"]:
            response.headers.add(str(k), str(x))
        return response
    raise ValueError(f"unknown tag {tag!r}")


def _hashable(k: Any) -> Any:
    if isinstance(k, list | dict):
        raise TypeError("a dict key decoded to an unhashable value")
    return k
