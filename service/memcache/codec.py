r"""The versioned, safe format of every value this service writes to memcached.

memcached is shared: another app, an older release of ours, or an attacker who can reach
port 11211 may have written the bytes we read. So a value is data, never code: it is
decoded as JSON (orjson) or as raw bytes, never unpickled, and anything that does not
start with our header is refused with :class:`~service.errors.CodecError`, which callers
treat as a miss. Decoding raises nothing else, whatever the bytes.

Layout: ``MAGIC (3 bytes) | VERSION (1 byte) | KIND (1 byte) | payload``.

=====  =====================================================================
kind   payload
=====  =====================================================================
``b``  raw bytes (``bytes``; a ``bytearray`` or ``memoryview`` comes back as bytes)
``s``  UTF-8 text (exactly ``str``)
``j``  JSON that decodes to the value as it is: only exact ``dict`` (text keys),
       ``list``, ``str``, ``int`` (64-bit), finite ``float``, ``bool`` and ``None``
``t``  JSON with tags, below, for everything else
``f``  framed: an 8-byte big-endian length N, N bytes of the ``t`` payload, then raw
       bytes that its ``\0B`` tags point into (below)
``c``  a chunk manifest (see :mod:`service.chunks`): the value is split over items
=====  =====================================================================

Why ``f``: a large ``bytes`` leaf (an origin's body of 50 MB, say) carried as base64 inside
JSON costs a third more space, and decoding it is one parse of the whole text and one
base64 pass, each holding the interpreter for hundreds of milliseconds. Framed, such a
leaf (:data:`OUT_OF_LINE` bytes or more) stays raw after the JSON, which is then small:
decoding parses the small JSON and takes each leaf as it is, and :func:`prepare` builds a
leaf straight from the pieces of a chunked value with one join that runs off the hub.

A tag is a one-key object whose key is NUL and a letter; a real dict that looks like one
is itself wrapped in ``\0d``. In the ``t`` payload:

=======  ========================  ================================================
tag      type                      payload
=======  ========================  ================================================
``\0t``  tuple                     [values]
``\0b``  bytes                     base64 (a bytearray or memoryview comes back as bytes)
``\0B``  bytes, out of line (``f``) [offset, length] into the raw bytes after the JSON
``\0d``  dict, keys not all text   [[key, value], ...]
``\0o``  OrderedDict               [[key, value], ...]
``\0s``  set                       [values], sorted by their JSON so that equal sets
``\0z``  frozenset                 encode alike in every process (ETags, memoize keys)
``\0i``  int beyond 64 bits        decimal text
``\0f``  float inf, -inf, nan      ``repr``
``\0n``  decimal.Decimal           its text, exact; exponent and length within 4300
``\0u``  uuid.UUID                 its text
``\0m``  markupsafe.Markup         the markup text
``\0D``  datetime.date             ISO 8601
``\0T``  datetime.datetime         [naive ISO 8601, fold, tz]; tz is null, [offset in
``\0H``  datetime.time             microseconds, name or null] for a ``datetime.timezone``,
                                   or the key of a ``zoneinfo.ZoneInfo``
``\0p``  datetime.timedelta        [days, seconds, microseconds]
``\0r``  flask.Response            {status, headers, body (base64)}
``\0c``  a dataclass               [module:qualname, {field: value}], every field
``\0N``  a NamedTuple              [module:qualname, [values]]
``\0e``  an Enum member            [module:qualname, member name]
=======  ========================  ================================================

Exact types are checked (``type(v) is dict``), not ``isinstance``: a ``defaultdict``, a
``Counter``, a ``str`` subclass or an arbitrary object would come back as something else,
so :func:`encode` refuses it and names its type instead.

A class is named on the wire as ``module:qualname`` and resolves only through the registry
in :mod:`service.classes`, never by importing: that module says why, and how a class gets
registered (its :func:`~service.classes.register` is re-exported here). An unknown name is a
:class:`CodecError`, i.e. a miss.

A new layout gets a new VERSION; a reader that sees a version it does not know treats the
value as a miss, so a rolling deploy never misreads an item written by the other release.
An older release that meets a tag it does not know also treats the value as a miss.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import math
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import orjson
from flask import Response
from markupsafe import Markup

from ..errors import CodecError
from . import classes
from .classes import register as register  # public API, re-exported

MAGIC = b"\x00sw"
VERSION = 1
HEADER_LEN = len(MAGIC) + 2
_HEADER = MAGIC + bytes([VERSION])

KIND_BYTES = b"b"
KIND_TEXT = b"s"
KIND_JSON = b"j"
KIND_TAGGED = b"t"
KIND_CHUNKED = b"c"
KIND_FRAMED = b"f"

OUT_OF_LINE = 64 * 1024
"""A ``bytes`` leaf this long or longer is written raw after the JSON (kind ``f``)."""
_FRAME_LEN = 8

Join = Callable[[list[bytes]], bytes]
"""Joins pieces into one ``bytes`` (for a large value: off the hub, see chunks)."""

_INT_LIMIT = 2**63
# CPython caps int <-> str conversion at 4300 digits against the same denial of service
# (CVE-2020-10735): a hostile Decimal("1e999999999") parses cheaply, but int() or
# f"{d:f}" of it would build a billion digits. So its text and exponent stay within this.
_DECIMAL_LIMIT = 4300
_US = timedelta(microseconds=1)
_ATOMS, _TEXT, _FLOAT = {str, int, bool, type(None)}, {str}, {float}
_SCALARS = _ATOMS | _FLOAT


def header(kind: bytes) -> bytes:
    return _HEADER + kind


def encode(value: Any, join: Join | None = None) -> bytes:
    """Encode a value of one of the types in the module docstring.

    Exact builtin JSON types take one checking pass and one ``orjson.dumps``; only a
    value that holds something else is rebuilt with tags.

    :param join: joins the parts of a value with large bytes in it (the chunks' join,
        off the hub; it may yield); by default ``b"".join``, here and now.

    :raises CodecError: the value holds something the format cannot carry faithfully (the
        message names its type); the caller decides whether to skip caching it.
    """
    t = type(value)
    if t is bytes or t is bytearray or t is memoryview:
        if join is not None and len(value) >= OUT_OF_LINE:
            return join([header(KIND_BYTES), bytes(value)])
        return header(KIND_BYTES) + bytes(value)
    if t is str:
        return header(KIND_TEXT) + str.encode(value, "utf-8", "surrogatepass")
    try:
        if _is_plain(value):
            try:
                return header(KIND_JSON) + orjson.dumps(value)
            except orjson.JSONEncodeError:
                pass  # an int beyond 64 bits (or nesting too deep): the tagged path decides
        _frame.blobs = None
        try:
            text = orjson.dumps(_tag(value))
            blobs: list[bytes] | None = _frame.blobs
        finally:
            _frame.blobs = None  # also when tagging failed half-way
        if blobs is None:
            return header(KIND_TAGGED) + text
        parts = [header(KIND_FRAMED), len(text).to_bytes(_FRAME_LEN, "big"), text, *blobs]
        return b"".join(parts) if join is None else join(parts)
    except RecursionError:
        raise CodecError("cannot encode a value nested too deeply or containing itself"
                         ) from None
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise CodecError(f"cannot encode {classes.name_of(t)}: {exc}") from exc


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
        version, kind, tag or class, or a chunk manifest (which :mod:`service.chunks`
        resolves first). Never anything else, whatever the bytes.
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
        if kind == KIND_FRAMED:
            if len(payload) < _FRAME_LEN:
                raise ValueError("a framed value shorter than its frame")
            end = _FRAME_LEN + int.from_bytes(payload[:_FRAME_LEN], "big")
            if end > len(payload):
                raise ValueError("a framed value shorter than its JSON")
            blobs = payload[end:]
            return _untag_framed(payload[_FRAME_LEN:end], lambda a, b: bytes(blobs[a:b]),
                                 len(blobs))
    # Every way a payload can be malformed: bad JSON, UTF-8, base64, ISO dates or zone keys
    # (ValueError), a tag payload of the wrong shape (TypeError, LookupError), a date,
    # timedelta or Decimal out of range (ValueError, ArithmeticError), nesting too deep.
    except (ValueError, TypeError, LookupError, ArithmeticError, RecursionError) as exc:
        raise CodecError(f"corrupt {kind.decode('ascii', 'replace')!r} value: "
                         f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    raise CodecError(f"unknown kind {kind!r}")


class Prepared:
    """A large value with the costly part of decoding done once: :meth:`value` gives each
    reader a value of its own (its own dicts and lists, which it may change) that shares
    the large immutable leaves (``bytes``, ``str``) with every other reader's.

    Kinds ``b`` and ``s`` are one immutable object, shared as it is. Kind ``f`` keeps its
    out-of-line leaves, built once, and parses its (small) JSON per reader. Kinds ``j``
    and ``t`` keep the joined bytes and parse them per reader: a large value made of many
    small objects costs one parse per reader, holding the interpreter while it runs
    (store such a value as bytes to keep it off the hub).
    """

    __slots__ = ("_build",)

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build

    def value(self) -> Any:
        """A decoded value for one reader.

        :raises CodecError: as :func:`decode`.
        """
        return self._build()


class _Pieces:
    """Byte ranges of a value held as consecutive pieces, taken without joining them all."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self.pieces = pieces
        self.starts: list[int] = []
        total = 0
        for piece in pieces:
            self.starts.append(total)
            total += len(piece)
        self.length = total

    def take(self, start: int, end: int) -> list[bytes]:
        """The parts of ``[start, end)``: whole pieces as they are (no copy), the two
        ends sliced."""
        parts: list[bytes] = []
        for piece, first in zip(self.pieces, self.starts, strict=True):
            last = first + len(piece)
            if last <= start or first >= end:
                continue
            a, b = max(start - first, 0), min(end, last) - first
            parts.append(piece if a == 0 and b == len(piece) else piece[a:b])
        return parts


def prepare(pieces: Sequence[bytes], join: Join) -> Prepared:
    """Decode the value held by ``pieces`` (a chunked value's, in order) as far as readers
    can share it (see :class:`Prepared`), with ``join`` for every large concatenation.

    :raises CodecError: as :func:`decode`.
    """
    held = _Pieces(pieces)
    kind = kind_of(b"".join(held.take(0, HEADER_LEN + _FRAME_LEN)))
    if kind == KIND_BYTES:
        data = join(held.take(HEADER_LEN, held.length))
        return Prepared(lambda: data)
    if kind == KIND_FRAMED:
        frame = held.take(HEADER_LEN, HEADER_LEN + _FRAME_LEN)
        if held.length < HEADER_LEN + _FRAME_LEN:
            raise CodecError("corrupt 'f' value: shorter than its frame")
        end = HEADER_LEN + _FRAME_LEN + int.from_bytes(b"".join(frame), "big")
        if end > held.length:
            raise CodecError("corrupt 'f' value: shorter than its JSON")
        text = join(held.take(HEADER_LEN + _FRAME_LEN, end))
        room = held.length - end
        tree = _guarded(KIND_FRAMED, lambda: orjson.loads(text))
        # Each leaf is built once, here (the joins may yield), and then shared by every
        # reader's value: bytes never change.
        leaves = {(a, b): join(held.take(end + a, end + b))
                  for a, b in _out_of_line(tree) if 0 <= a <= b <= room}

        def leaf(a: int, b: int) -> bytes:
            return leaves[(a, b)]

        return Prepared(lambda: _guarded(KIND_FRAMED, lambda: _untag_framed(
            text, leaf, room)))
    data = join(list(held.pieces))
    if kind == KIND_TEXT:
        text_value = decode(data)
        return Prepared(lambda: text_value)
    return Prepared(lambda: decode(data))


# ---- encoding ------------------------------------------------------------------------

def _is_plain(v: Any) -> bool:
    """True when orjson alone writes ``v`` so that it reads back equal and same-typed.

    Ints are not range-checked: orjson refuses those beyond 64 bits, and :func:`encode`
    then takes the tagged path. The sets of types are built at C speed.
    """
    t = type(v)
    if t is list:
        items = v
    elif t is dict:
        if not set(map(type, v)) <= _TEXT:
            return False
        items = v.values()
    else:
        return t in _ATOMS or (t is float and v - v == 0.0)  # False for inf and nan
    kinds = set(map(type, items))
    if kinds <= _ATOMS:
        return True
    if kinds <= _SCALARS:  # only the floats need a look: are they finite?
        floats = items if kinds == _FLOAT else [x for x in items if type(x) is float]
        return all(map(math.isfinite, floats))
    return all(map(_is_plain, items))


def _tag(v: Any) -> Any:
    t = type(v)
    if t is str or t is bool or v is None:
        return v
    if t is int:
        if -_INT_LIMIT <= v < _INT_LIMIT:
            return v
        try:
            return {"\x00i": str(v)}
        except ValueError as exc:  # beyond CPython's int -> str limit
            raise CodecError(f"cannot encode an int this large: {exc}") from None
    if t is float:
        return v if v - v == 0.0 else {"\x00f": repr(v)}
    if t is list:
        return [_tag(x) for x in v]
    if t is bytearray or t is memoryview:
        return _tag(bytes(v))
    if t is dict:
        if set(map(type, v)) <= _TEXT and not (len(v) == 1 and next(iter(v))[:1] == "\x00"):
            return {k: _tag(x) for k, x in v.items()}
        return {"\x00d": _pairs(v)}
    encoder = _ENCODERS.get(t)
    if encoder is not None:
        return encoder(v)
    # Values carried by class: their class is registered in service.classes as they go.
    if isinstance(v, enum.Enum):
        return classes.tag_enum(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return classes.tag_dataclass(v, _tag)
    if isinstance(v, tuple) and classes.tag_of_class(t) == "\x00N":
        return classes.tag_namedtuple(v, _tag)
    if isinstance(v, Response):
        # A response is carried as its HTTP meaning: any subclass comes back a flask.Response.
        if v.is_streamed:
            raise CodecError("cannot encode a streamed response")
        return {"\x00r": {"status": v.status_code, "headers": [list(h) for h in v.headers],
                          "body": base64.b64encode(v.get_data()).decode("ascii")}}
    raise CodecError(f"cannot encode a value of type {classes.name_of(t)}: only the exact "
                     "types listed in service.codec are carried (a subclass would come back "
                     "as its base)")


def _pairs(v: dict[Any, Any]) -> list[list[Any]]:
    return [[_tag(k), _tag(x)] for k, x in v.items()]


def _tag_tz(tz: tzinfo | None) -> Any:
    if tz is None:
        return None
    if type(tz) is timezone:
        offset, name = tz.utcoffset(None), tz.tzname(None)
        return [offset // _US, None if timezone(offset).tzname(None) == name else name]
    if type(tz) is ZoneInfo and tz.key is not None:
        return tz.key
    raise CodecError(f"cannot encode a tzinfo of type {classes.name_of(type(tz))}: only "
                     "datetime.timezone and zoneinfo.ZoneInfo (with a key) are carried")


# The out-of-line leaves of the value being encoded (as "blobs", only once there is one),
# per thread: under gevent that is per greenlet, and encoding never yields anyway.
_frame = threading.local()


def _tag_bytes(v: bytes) -> Any:
    if len(v) < OUT_OF_LINE or getattr(_frame, "inline", False):
        return {"\x00b": base64.b64encode(v).decode("ascii")}
    blobs: list[bytes] | None = getattr(_frame, "blobs", None)
    if blobs is None:
        blobs = _frame.blobs = []
    offset = sum(map(len, blobs))
    blobs.append(v)
    return {"\x00B": [offset, len(v)]}


def _sorted_members(v: set[Any] | frozenset[Any]) -> list[Any]:
    # A set's members are tagged in hash order, which differs between processes: their
    # bytes stay inline, or the offsets of out-of-line ones would make equal sets encode
    # differently (and so give them different ETags and memoize keys).
    outer = getattr(_frame, "inline", False)
    _frame.inline = True
    try:
        return sorted(map(_tag, v), key=orjson.dumps)
    finally:
        _frame.inline = outer


_ENCODERS: dict[type, Callable[[Any], Any]] = {
    tuple: lambda v: {"\x00t": [_tag(x) for x in v]},
    bytes: _tag_bytes,
    OrderedDict: lambda v: {"\x00o": _pairs(v)},
    set: lambda v: {"\x00s": _sorted_members(v)},
    frozenset: lambda v: {"\x00z": _sorted_members(v)},
    Decimal: lambda v: {"\x00n": _check_decimal(v, str(v))},
    uuid.UUID: lambda v: {"\x00u": str(v)},
    Markup: lambda v: {"\x00m": str.__str__(v)},
    date: lambda v: {"\x00D": v.isoformat()},
    datetime: lambda v: {"\x00T": [v.replace(tzinfo=None).isoformat(), v.fold,
                                   _tag_tz(v.tzinfo)]},
    time: lambda v: {"\x00H": [v.replace(tzinfo=None).isoformat(), v.fold, _tag_tz(v.tzinfo)]},
    timedelta: lambda v: {"\x00p": [v.days, v.seconds, v.microseconds]},
}


# ---- decoding --------------------------------------------------------------------------

Leaf = Callable[[int, int], bytes]


def _guarded(kind: bytes, build: Callable[[], Any]) -> Any:
    """``build()``, with every way a payload can be malformed turned into CodecError."""
    try:
        return build()
    except (ValueError, TypeError, LookupError, ArithmeticError, RecursionError) as exc:
        raise CodecError(f"corrupt {kind.decode('ascii', 'replace')!r} value: "
                         f"{type(exc).__name__}: {str(exc)[:200]}") from exc


def _untag_framed(text: memoryview | bytes, leaf: Leaf, room: int) -> Any:
    """Untag the JSON of a framed value; ``leaf(a, b)`` gives its raw bytes ``[a, b)``."""
    tree = orjson.loads(text)
    # Nothing below yields (leaves are built before, see prepare), so the frame's leaf
    # source can sit beside the encoder's blobs: per thread, or per greenlet under gevent.
    _frame.leaf = (leaf, room)
    try:
        return _untag(tree)
    finally:
        _frame.leaf = None


def _out_of_line(tree: Any) -> list[tuple[int, int]]:
    """The ``[start, end)`` of every well-formed out-of-line tag in ``tree`` (a malformed
    one is left for :func:`_untag` to refuse)."""
    refs: list[tuple[int, int]] = []
    stack = [tree]
    while stack:
        v = stack.pop()
        if type(v) is list:
            stack.extend(v)
        elif type(v) is dict:
            inner = v.get("\x00B") if len(v) == 1 else None
            if (type(inner) is list and len(inner) == 2 and type(inner[0]) is int
                    and type(inner[1]) is int):
                refs.append((inner[0], inner[0] + inner[1]))
            else:
                stack.extend(v.values())
    return refs


def _leaf_from(inner: Any) -> bytes:
    found: tuple[Leaf, int] | None = getattr(_frame, "leaf", None)
    if found is None:
        raise ValueError("an out-of-line bytes tag outside a framed value")
    leaf, room = found
    offset, length = _want(list, inner)
    a, n = _want(int, offset), _want(int, length)
    if not (0 <= a and 0 <= n and a + n <= room):
        raise ValueError(f"an out-of-line bytes tag beyond the frame ({a}+{n} > {room})")
    return leaf(a, a + n)


_T = TypeVar("_T")


def _want(kind: type[_T], v: Any) -> _T:
    if type(v) is not kind:  # exact: True is not an int here
        raise TypeError(f"expected {kind.__name__}, got {type(v).__name__}")
    return v


def _untag(v: Any) -> Any:
    if type(v) is list:
        return [_untag(x) for x in v]
    if type(v) is not dict:
        return v
    if len(v) == 1:
        (tag, inner), = v.items()
        if tag[:1] == "\x00":
            decoder = _DECODERS.get(tag)
            if decoder is None:
                raise ValueError(f"unknown tag {tag[:20]!r}")
            return decoder(inner)
    return {k: _untag(x) for k, x in v.items()}


def _check_decimal(d: Decimal | None, text: str) -> str:
    exponent = 0 if d is None else d.as_tuple().exponent
    if len(text) > _DECIMAL_LIMIT + 20 or (
            type(exponent) is int and not -_DECIMAL_LIMIT <= exponent <= _DECIMAL_LIMIT):
        raise CodecError(f"a Decimal beyond {_DECIMAL_LIMIT} digits or exponent")
    return text


def _decimal_from(inner: Any) -> Decimal:
    text = _check_decimal(None, _want(str, inner))  # the length first: parsing stays cheap
    d = Decimal(text)
    _check_decimal(d, text)
    return d


def _tz_from(v: Any) -> tzinfo | None:
    if v is None:
        return None
    if type(v) is str:
        try:
            # A zone key is data: ZoneInfo accepts only a relative path under TZPATH.
            return ZoneInfo(v)
        except OSError as exc:
            raise ValueError(f"unreadable time zone {v[:50]!r}") from exc
    offset, name = _want(list, v)
    delta = timedelta(microseconds=_want(int, offset))
    return timezone(delta) if name is None else timezone(delta, _want(str, name))


def _clock_from(cls: type[datetime] | type[time], inner: Any) -> Any:
    iso, fold, tz = _want(list, inner)
    naive = cls.fromisoformat(_want(str, iso))
    return naive.replace(tzinfo=_tz_from(tz), fold=_want(int, fold))


def _timedelta_from(inner: Any) -> timedelta:
    days, seconds, microseconds = _want(list, inner)
    return timedelta(_want(int, days), _want(int, seconds), _want(int, microseconds))


def _response_from(inner: Any) -> Response:
    body, status = _want(dict, inner)["body"], inner["status"]
    response = Response(base64.b64decode(_want(str, body), validate=True), _want(int, status))
    response.headers.clear()
    for pair in _want(list, inner["headers"]):
        k, x = _want(list, pair)
        response.headers.add(_want(str, k), _want(str, x))
    return response


def _pairs_from(inner: Any) -> list[tuple[Any, Any]]:
    return [(_untag(k), _untag(x)) for k, x in (_want(list, p) for p in _want(list, inner))]


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "\x00t": lambda v: tuple(_untag(x) for x in _want(list, v)),
    "\x00b": lambda v: base64.b64decode(_want(str, v), validate=True),
    "\x00B": _leaf_from,
    "\x00d": lambda v: dict(_pairs_from(v)),
    "\x00o": lambda v: OrderedDict(_pairs_from(v)),
    "\x00s": lambda v: {_untag(x) for x in _want(list, v)},
    "\x00z": lambda v: frozenset(_untag(x) for x in _want(list, v)),
    "\x00i": lambda v: int(_want(str, v)),
    "\x00f": lambda v: float(_want(str, v)),
    "\x00n": _decimal_from,
    "\x00u": lambda v: uuid.UUID(_want(str, v)),
    "\x00m": lambda v: Markup(_want(str, v)),
    "\x00D": lambda v: date.fromisoformat(_want(str, v)),
    "\x00T": lambda v: _clock_from(datetime, v),
    "\x00H": lambda v: _clock_from(time, v),
    "\x00p": _timedelta_from,
    "\x00r": _response_from,
    "\x00c": lambda v: classes.dataclass_from(v, _untag),
    "\x00N": lambda v: classes.namedtuple_from(v, _untag),
    "\x00e": classes.enum_from,
}
