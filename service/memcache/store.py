"""The memcached store: logical keys and Python values in, legal keys and safe bytes out.

This is the thin adapter every higher layer uses (the Flask-Caching backend, the
two-tier cache, leases, counters), each with a :class:`Store` of its own namespace. It
maps keys with :mod:`service.keys`, encodes values with :mod:`service.codec`, splits values
larger than memcached's item size over several items (:mod:`service.chunks`), and
borrows a pooled connection (:func:`service.clients.borrow`) for each operation only: a
store needs no app context and holds no connection between calls.

Non-negative integers below 2**64 are stored as bare ASCII digits, which is what
memcached's ``incr``/``decr`` work on, so a counter and a value written by ``set`` are the
same item; bare digits read back as an ``int``.

Failures of memcached itself surface as :class:`~service.errors.CacheUnavailable` (raised
by the connection, the one error boundary); a value that does not decode is a miss,
logged and counted, and never raises.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from operator import methodcaller
from typing import Any, Final, Protocol

import gevent
from pymemcache.client.base import Client
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownCommandError,
)

from ..errors import CodecError
from ..observe import metrics
from ..observe.logs import event, key_hash
from . import chunks, codec, meta
from .clients import ClientPool, borrow
from .connection import Connection
from .expiry import THIRTY_DAYS
from .expiry import expire_time as expire_time
from .keys import memcached_key

log = logging.getLogger(__name__)


class _Miss:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"

    def __bool__(self) -> bool:
        return False


MISS: Final = _Miss()
"""Returned when a key is absent or its bytes do not decode (``None`` is a real value)."""


class _Empty:
    __slots__ = ()

    def __repr__(self) -> str:
        return "EMPTY"

    def __bool__(self) -> bool:
        return False


EMPTY: Final = _Empty()
"""An item of zero bytes: a claim (memcached's vivified item, or its classic stand-in).
No value the store writes is empty (the codec always writes a header)."""


@dataclass(frozen=True)
class Got:
    """What :meth:`Store.mget` read.

    :param value: the decoded value, :data:`MISS` (absent or undecodable) or
        :data:`EMPTY` (somebody's claim).
    :param cas: the item's CAS token (the fence for a later :meth:`Store.mset`).
    :param ttl: seconds the item has left by the server's clock (``-1``: no expiry);
        ``None`` when the server cannot say (a proxy without meta commands).
    :param won: this call created the empty item: the claim is ours.
    :param size: a chunked value's whole encoded length, so that a caller can tell a
        large value without encoding it again; 0 for a value held in one item.
    """

    value: Any
    cas: bytes | None = None
    ttl: int | None = None
    won: bool = False
    size: int = 0


@dataclass(frozen=True)
class Stored:
    """What :meth:`Store.mset` did: ``code`` is ``"HD"`` (stored), ``"NS"`` (add found the
    key), ``"EX"`` (the CAS changed: somebody wrote or invalidated) or ``"NF"`` (the item
    is gone); ``cas`` is the new item's token when the server says it; ``size`` the
    value's encoded length (a large one's whole length, not its manifest's)."""

    code: str
    cas: bytes | None = None
    size: int = 0

    @property
    def ok(self) -> bool:
        return self.code == "HD"

_ITEM_OVERHEAD = 512  # room for the item header, key and flags within the item size
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_COUNTER_MAX = 2**64 - 1
# Rounds of read-compute-CAS (with growing pauses) before increment() gives up.
_CAS_ATTEMPTS = 64
# An absolute expiry (anything over 30 days is a Unix time) in 1970: memcached stores an
# item written with it already expired, so a CAS write with it is a compare-and-delete.
_LONG_AGO = THIRTY_DAYS + 1
_REFUSED: Final = object()
# The servers of each pool that refused a meta command (see Store.delete_if).
_no_meta: weakref.WeakKeyDictionary[ClientPool, set[str]] = weakref.WeakKeyDictionary()


def _meta_delete(mkey: bytes, token: bytes, client: Client) -> Any:
    """``md <key> C<cas>``; :data:`_REFUSED` when the server does not take the command.

    Caught here, inside the call, so that a proxy refusing one command is not counted as a
    failure of the server (which would open its circuit for every command).
    """
    try:
        return client.raw_command(b"md " + mkey + b" C" + token)
    except (MemcacheClientError, MemcacheUnexpectedCloseError, ConnectionResetError,
            BrokenPipeError):
        client.close()  # whatever is left on the socket must not be read as an answer
        return _REFUSED


def _meta_command(head: bytes, payload: bytes | None, client: Client) -> Any:
    """One meta command; :data:`_REFUSED` when the server does not take meta commands
    (caught inside the call, as in :func:`_meta_delete`)."""
    try:
        return meta.command(client, head, payload)
    except (MemcacheUnknownCommandError, MemcacheUnexpectedCloseError, ConnectionResetError,
            BrokenPipeError):
        client.close()
        return _REFUSED


def _is_counter(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _COUNTER_MAX


def _counter_bytes(data: bytes) -> bytes | None:
    # memcached's decr shortens a number in place and pads it with spaces ("10" -> "9 ").
    digits = data.rstrip(b" ")
    return digits if digits.isdigit() and len(digits) <= 20 else None


_CHUNKED = codec.header(codec.KIND_CHUNKED)


def _size(data: bytes) -> int:
    return chunks.declared_length(data) if data.startswith(_CHUNKED) else 0


@dataclass(frozen=True)
class _Chunked:
    """A large value's manifest, read under ``key``: resolved by :meth:`Store._resolve`."""

    key: str
    manifest: bytes


class KeyValue(Protocol):
    """What the read path needs of a store: :class:`Store` over memcached, or the
    in-memory stand-in of the unit tests (``tests/memstore.py``), which one contract
    suite runs side by side with this one (``tests/integration/test_store_contract.py``)."""

    def key(self, key: str) -> bytes: ...

    def child(self, family: str, follow: bool = False) -> KeyValue: ...

    def get(self, key: str) -> Any: ...

    def gets(self, key: str) -> tuple[Any, bytes | None]: ...

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]: ...

    def set(self, key: str, value: Any, ttl: float | None = None) -> bool: ...

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool: ...

    def delete(self, key: str) -> bool: ...

    def incr(self, key: str, delta: int = 1) -> int | None: ...

    def add_counter(self, key: str, initial: int = 0) -> bool: ...

    def get_counter(self, key: str) -> int | None: ...

    def mget(self, key: str, vivify: float | None = None) -> Got: ...

    def mset(self, key: str, value: Any, ttl: float | None, cas: bytes | None = None,
             add: bool = False) -> Stored: ...

    def mdelete(self, key: str, cas: bytes | None = None) -> str: ...

    def touch_if(self, key: str, cas: bytes | None, ttl: float) -> bool: ...


class Store:
    """Typed memcached operations for one namespace.

    :param pool: the pool to borrow connections from (:func:`service.clients.pool_for`).
    :param namespace: this user's key space, e.g. ``"svc.swr"``; letters, digits, ``.``,
        ``-``, ``_``. Two stores with different namespaces never see each other's keys.
    :param item_size_max: memcached's item size limit (its ``-I``); larger values are split.
    :raises ValueError: an illegal namespace.
    """

    def __init__(self, pool: ClientPool, namespace: str, item_size_max: int,
                 follows: Store | None = None) -> None:
        if not _NAMESPACE_RE.match(namespace):
            raise ValueError(f"namespace {namespace!r}: use 1-64 of A-Z a-z 0-9 . - _")
        self.pool = pool
        self.namespace = namespace
        self.item_size_max = item_size_max
        self.chunk_size = max(1024, item_size_max - _ITEM_OVERHEAD)
        self._follows = follows

    def child(self, family: str, follow: bool = False) -> Store:
        """The store of one family of keys beside this store's own (leases, invalidation
        marks, counters, generations, the admin's records): its own namespace
        (``<namespace>.<family>``), so no caller spells a family into a key, and no key of
        this store (a public one, say) can ever name a key of the family.

        :param follow: a key of the family lives on the server of the same key of this
            store (a lease and its entry, on one server: one of them never outlives the
            other's server alone).
        """
        return Store(self.pool, f"{self.namespace}.{family}", self.item_size_max,
                     follows=self if follow else None)

    def _home(self, key: str, mkey: bytes) -> bytes:
        """The memcached key whose server holds ``key``."""
        return self._follows.key(key) if self._follows is not None else mkey

    def key(self, key: str) -> bytes:
        """The memcached key of ``key`` in this namespace."""
        return memcached_key(self.namespace, key)

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        """The value under ``key``, or :data:`MISS`."""
        return self.gets(key)[0]

    def gets(self, key: str) -> tuple[Any, bytes | None]:
        """The value and its CAS token, or ``(MISS, None)`` when absent."""
        mkey = self.key(key)
        with borrow(self.pool) as conn:
            data, token = conn.call(conn.server_for(self._home(key, mkey)), "gets",
                                    lambda c: c.gets(mkey))
        if data is None:
            return MISS, None
        return self._resolve(self._decode(key, data)), token

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values found, by key; absent or undecodable keys are left out."""
        by_mkey = {self.key(k): k for k in keys}
        found: dict[str, Any] = {}
        large = False
        with borrow(self.pool) as conn:
            groups: dict[str, list[bytes]] = {}
            for mkey, key in by_mkey.items():
                groups.setdefault(conn.server_for(self._home(key, mkey)), []).append(mkey)
            for server, mkeys in groups.items():
                raw: dict[bytes, bytes] = conn.call(server, "get_many",
                                                    methodcaller("get_many", mkeys))
                for mkey, data in raw.items():
                    value = self._decode(by_mkey[mkey], data)
                    if value is not MISS:
                        found[by_mkey[mkey]] = value
                        large = large or type(value) is _Chunked
        if large:  # read now, with the connection given back
            resolved = {key: self._resolve(value) for key, value in found.items()}
            return {key: value for key, value in resolved.items() if value is not MISS}
        return found

    def _decode(self, key: str, data: bytes) -> Any:
        """The value ``data`` holds; a :class:`_Chunked` for a large value's manifest, to
        be read by :meth:`_resolve` once the caller has given its connection back."""
        try:
            if data[:1].isdigit():
                digits = _counter_bytes(data)
                if digits is None:
                    raise CodecError("digits followed by something else")
                return int(digits)
            if codec.kind_of(data) == codec.KIND_CHUNKED:
                return _Chunked(key, data)
            return codec.decode(data)
        except CodecError as exc:
            # Someone else's bytes (another app, an old release, an attacker's pickle):
            # never executed, only counted and read as a miss.
            metrics.memcached_errors_total.labels("decode").inc()
            event(log, logging.WARNING, "undecodable",
                  f"memcached holds a value this service cannot decode (key "
                  f"{key_hash(key)}), read as a miss: {exc}", key=key)
            return MISS

    def _resolve(self, value: Any) -> Any:
        """``value``, or for a :class:`_Chunked` the large value it names (or MISS).

        Called with no connection borrowed: the read shared by this worker's readers of the
        value borrows one for its fetch, and the readers that wait for it hold none.
        """
        if type(value) is not _Chunked:
            return value
        try:
            return chunks.read_value(self.pool, self.key, value.key, value.manifest)
        except CodecError as exc:
            metrics.memcached_errors_total.labels("decode").inc()
            log.warning("undecodable value under %s: %s", self.key(value.key).decode(), exc)
            return MISS

    # -- writes --------------------------------------------------------------------------

    def set(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store ``value``; ``ttl`` as in :func:`~service.expiry.expire_time`.

        :raises CodecError: the codec cannot represent the value (nothing was written).
        """
        data = self._encode(value)
        with borrow(self.pool) as conn:
            mkey, data = self._prepare(conn, key, data, ttl)
            return bool(conn.call(conn.server_for(mkey), "set",
                                  lambda c: c.set(mkey, data, expire_time(ttl))))

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store only if absent; ``False`` when the key exists (never lies: no noreply).

        :raises CodecError: the codec cannot represent the value.
        """
        data = self._encode(value)
        with borrow(self.pool) as conn:
            mkey, data = self._prepare(conn, key, data, ttl)
            return bool(conn.call(conn.server_for(mkey), "add",
                                  lambda c: c.add(mkey, data, expire_time(ttl))))

    def cas(self, key: str, value: Any, token: bytes, ttl: float | None = None) -> bool | None:
        """Store only if unchanged since ``gets`` gave ``token``.

        :return: ``True`` stored, ``False`` someone wrote in between, ``None`` the key
            is gone.
        :raises CodecError: the codec cannot represent the value.
        """
        data = self._encode(value)
        with borrow(self.pool) as conn:
            return self._cas(conn, key, data, token, ttl)

    def _cas(self, conn: Connection, key: str, data: bytes, token: bytes,
             ttl: float | None) -> bool | None:
        mkey, data = self._prepare(conn, key, data, ttl)
        result = conn.call(conn.server_for(mkey), "cas",
                           lambda c: c.cas(mkey, data, token, expire_time(ttl)))
        return None if result is None else bool(result)

    def set_many(self, mapping: Mapping[str, Any], ttl: float | None = None) -> list[str]:
        """Store several values, one round trip per server; returns the keys stored.

        A value the codec refuses is logged and left out (the others are stored).
        """
        encoded: dict[str, bytes] = {}
        for key, value in mapping.items():
            try:
                encoded[key] = self._encode(value)
            except CodecError as exc:
                event(log, logging.WARNING, "not_stored",
                      f"not stored (key {key_hash(key)}): the value cannot be encoded: {exc}",
                      key=key)
        stored: set[bytes] = set()
        with borrow(self.pool) as conn:
            items = dict(self._prepare(conn, key, data, ttl) for key, data in encoded.items())
            for server, mkeys in conn.by_server(items).items():
                failed = conn.call(server, "set_many", methodcaller(
                    "set_many", {k: items[k] for k in mkeys}, expire_time(ttl)))
                stored.update(set(mkeys) - set(failed))
        return [key for key in encoded if self.key(key) in stored]

    def delete(self, key: str) -> bool:
        """``True`` if the key existed and is now gone, ``False`` if it was absent."""
        with borrow(self.pool) as conn:
            return self._delete(conn, key)

    def _delete(self, conn: Connection, key: str) -> bool:
        mkey = self.key(key)
        return bool(conn.call(conn.server_for(mkey), "delete", lambda c: c.delete(mkey)))

    def delete_many(self, keys: Iterable[str]) -> list[str]:
        """Delete several keys; returns those that existed."""
        with borrow(self.pool) as conn:
            return [key for key in keys if self._delete(conn, key)]

    def delete_if(self, key: str, expected: Any) -> bool:
        """Delete ``key`` only while it still holds ``expected``: read, compare, then
        delete only if nobody wrote in between (compare-and-delete on the CAS token).

        The compare-and-delete is memcached's meta ``md <key> C<cas>`` (memcached >= 1.6).
        A server that refuses it (twemproxy closes the connection on any meta command;
        memcached < 1.6 answers ``ERROR``) is remembered per pool, after checking with
        ``version`` that it is alive (a dead server is an outage, not a missing command,
        and feeds the circuit breaker as usual), and from then on gets the classic
        equivalent: ``cas`` with the same token writing an empty value whose expiry is an
        absolute time long past, which memcached stores already expired. That is as
        atomic as ``md`` and leaves nothing behind. (A CAS-written *short-lived* tombstone
        followed by a plain delete would not be: memcached expires items on whole-second
        ticks, so a "1 s" tombstone can vanish at once and the plain delete then removes
        somebody else's value.)

        :raises CacheUnavailable: memcached could not be asked.
        """
        value, token = self.gets(key)
        if value is MISS or value != expected or token is None:
            return False
        mkey = self.key(key)
        refusing = _no_meta.setdefault(self.pool, set())
        with borrow(self.pool) as conn:
            server = conn.server_for(mkey)
            if server not in refusing:
                answer = conn.call(server, "md", partial(_meta_delete, mkey, token))
                if answer is not _REFUSED:
                    return bool(answer == b"HD")  # EX: changed since our gets; NF: gone
                # Refused, or the connection closed: a proxy that does not speak meta
                # commands, or a server that just died. Only a live server is remembered.
                conn.call(server, "version", methodcaller("version"))
                refusing.add(server)
                log.warning("memcached %s does not accept meta commands (a proxy such as "
                            "twemproxy, or memcached < 1.6): compare-and-delete uses cas "
                            "with an expiry in the past there", server)
            stored = conn.call(server, "cas", lambda c: c.cas(mkey, b"", token, _LONG_AGO))
        return bool(stored)  # False: changed since our gets; None: already gone

    # -- meta commands: reads that claim, fenced writes ----------------------------------

    def mget(self, key: str, vivify: float | None = None) -> Got:
        """Read ``key`` with its CAS and remaining TTL; with ``vivify`` (seconds), a miss
        creates an empty item living that long and this call alone wins it.

        One ``mg <key> v c t [N<ttl>]``. Through a server without meta commands the
        classic equivalent (``gets``; on a miss ``add`` of an empty item, then ``gets``
        for its token) gives the same guarantee: exactly one caller wins.

        :raises CacheUnavailable: memcached could not be asked.
        """
        mkey = self.key(key)
        with borrow(self.pool) as conn:
            server = conn.server_for(self._home(key, mkey))

            def classic() -> Got:
                data, token = conn.call(server, "gets", lambda c: c.gets(mkey))
                won = False
                if data is None and vivify is not None:
                    won = bool(conn.call(server, "add", lambda c: c.add(
                        mkey, b"", expire_time(vivify))))
                    data, token = conn.call(server, "gets", lambda c: c.gets(mkey))
                if data is None:
                    return Got(MISS)
                return Got(self._raw(key, data), token, None, won and data == b"",
                           _size(data))

            head = b"mg " + mkey + b" v c t"
            if vivify is not None:
                head += b" N%d" % max(1, expire_time(vivify))
            reply = self._meta(conn, server, "mg", head, None, classic)
            if not isinstance(reply, Got):
                if reply.code == b"EN" or reply.data is None:
                    return Got(MISS)
                reply = Got(self._raw(key, reply.data), reply.cas, reply.ttl, reply.won,
                            _size(reply.data))
        if type(reply.value) is _Chunked:
            reply = dataclasses.replace(reply, value=self._resolve(reply.value))
        return reply

    def mset(self, key: str, value: Any, ttl: float | None, cas: bytes | None = None,
             add: bool = False) -> Stored:
        """Store ``value``: only while the item still has ``cas`` when given (the fence:
        ``EX`` when it changed, ``NF`` when it is gone; never turned into an add), only
        if absent with ``add``. ``value`` may be :data:`EMPTY` (a claim).

        :raises CodecError: the codec cannot represent the value.
        :raises CacheUnavailable: memcached could not be asked.
        """
        data = b"" if value is EMPTY else self._encode(value)
        size = len(data)
        with borrow(self.pool) as conn:
            mkey, data = self._prepare(conn, key, data, ttl)
            server = conn.server_for(self._home(key, mkey))
            exp = expire_time(ttl)

            def classic() -> Stored:
                if cas is not None:
                    done = conn.call(server, "cas", lambda c: c.cas(mkey, data, cas, exp))
                    return Stored("NF" if done is None else "HD" if done else "EX", None,
                                  size)
                if add:
                    done = conn.call(server, "add", lambda c: c.add(mkey, data, exp))
                    return Stored("HD" if done else "NS", None, size)
                conn.call(server, "set", lambda c: c.set(mkey, data, exp))
                return Stored("HD", None, size)

            head = b"ms " + mkey + b" %d T%d c" % (len(data), exp)
            if cas is not None:
                head += b" C" + cas
            if add:
                head += b" ME"
            reply = self._meta(conn, server, "ms", head, data, classic)
            if isinstance(reply, Stored):
                return reply
            return Stored(reply.code.decode("ascii"),
                          reply.cas if reply.code == b"HD" else None, size)

    def mdelete(self, key: str, cas: bytes | None = None) -> str:
        """Delete ``key``, only while it still has ``cas`` when given: ``"HD"`` deleted,
        ``"EX"`` changed since, ``"NF"`` already gone.

        :raises CacheUnavailable: memcached could not be asked.
        """
        mkey = self.key(key)
        with borrow(self.pool) as conn:
            server = conn.server_for(self._home(key, mkey))

            def classic() -> str:
                if cas is None:
                    return "HD" if conn.call(server, "delete",
                                             lambda c: c.delete(mkey)) else "NF"
                # A CAS write of an item already expired is an atomic compare-and-delete.
                done = conn.call(server, "cas", lambda c: c.cas(mkey, b"", cas, _LONG_AGO))
                return "NF" if done is None else "HD" if done else "EX"

            head = b"md " + mkey + (b" C" + cas if cas is not None else b"")
            reply = self._meta(conn, server, "md", head, None, classic)
            return reply.code.decode("ascii") if isinstance(reply, meta.Reply) else reply

    def touch_if(self, key: str, cas: bytes | None, ttl: float) -> bool:
        """Give an empty item (a cold claim) ``ttl`` more seconds while it still has
        ``cas``. A touch keeps memcached's "win already sent" mark, which a rewrite would
        clear. Two round trips (look, then touch); only a holder renewing its claim pays.

        :raises CacheUnavailable: memcached could not be asked.
        """
        got = self.mget(key)
        if cas is None or got.value is not EMPTY or got.cas != cas:
            return False
        mkey = self.key(key)
        with borrow(self.pool) as conn:
            server = conn.server_for(mkey)

            def classic() -> bool:
                return bool(conn.call(server, "touch",
                                      lambda c: c.touch(mkey, expire_time(ttl))))

            reply = self._meta(conn, server, "mg", b"mg " + mkey + b" T%d" % max(
                1, expire_time(ttl)), None, classic)
            return reply.code == b"HD" if isinstance(reply, meta.Reply) else bool(reply)

    def _raw(self, key: str, data: bytes) -> Any:
        return EMPTY if data == b"" else self._decode(key, data)

    def _meta(self, conn: Connection, server: str, name: str, head: bytes,
              payload: bytes | None, classic: Callable[[], Any]) -> Any:
        """Run a meta command on ``server``, or ``classic()`` where meta commands are not
        understood (see :meth:`delete_if` for how that is found out, once per server)."""
        refusing = _no_meta.setdefault(self.pool, set())
        if server in refusing:
            return classic()
        answer = conn.call(server, name, partial(_meta_command, head, payload))
        if answer is not _REFUSED:
            return answer
        # Refused, or the socket was dead (a restarted server closes every connection):
        # ask on a fresh one whether the server lives, then once more with the command.
        # Only a live server that refuses it twice is taken for one without meta commands.
        conn.call(server, "version", methodcaller("version"))
        answer = conn.call(server, name, partial(_meta_command, head, payload))
        if answer is not _REFUSED:
            return answer
        conn.call(server, "version", methodcaller("version"))
        refusing.add(server)
        log.warning("memcached %s does not accept meta commands (a proxy such as "
                    "twemproxy, or memcached < 1.6): using the classic commands there "
                    "(gets/add/cas), with the same guarantees", server)
        return classic()

    # -- counters ------------------------------------------------------------------------

    def incr(self, key: str, delta: int = 1) -> int | None:
        """memcached's atomic ``incr`` on a counter; ``None`` when the key is absent."""
        return self._arith("incr", key, delta)

    def decr(self, key: str, delta: int = 1) -> int | None:
        """memcached's atomic ``decr``: it stops at 0, never below (see :meth:`increment`
        for exact arithmetic); ``None`` when the key is absent."""
        return self._arith("decr", key, delta)

    def _arith(self, command: str, key: str, delta: int) -> int | None:
        mkey = self.key(key)
        with borrow(self.pool) as conn:
            result = conn.call(conn.server_for(mkey), command,
                               methodcaller(command, mkey, delta))
        return None if result is None else int(result)

    def add_counter(self, key: str, initial: int = 0) -> bool:
        """Create a counter that never expires; ``False`` when the key exists."""
        if not _is_counter(initial):
            raise ValueError(f"a counter starts at 0..2**64-1, not {initial!r}")
        return self.add(key, initial)

    def get_counter(self, key: str) -> int | None:
        """The counter's value; ``None`` when absent or not an integer."""
        value = self.get(key)
        return value if type(value) is int else None

    def increment(self, key: str, delta: int, ttl: float | None = None) -> int | None:
        """Add ``delta`` (negative too) to the integer under ``key``, exactly.

        A missing key starts from 0 and is created with ``ttl``. A non-negative counter
        grows with memcached's atomic ``incr`` (its expiry is kept). What ``incr``/``decr``
        cannot do exactly (going below 0, a negative value, a result past 2**64-1) is a
        ``gets``/``cas`` loop: read, compute, write only if nobody wrote in between, else
        read again; such a write sets the expiry to ``ttl``.

        :return: the new value; ``None`` (logged) when the value is not an integer, or
            the key kept changing for :data:`_CAS_ATTEMPTS` rounds.
        """
        mkey = self.key(key)
        with borrow(self.pool) as conn:
            server = conn.server_for(mkey)
            for attempt in range(_CAS_ATTEMPTS):
                if attempt:
                    # Lost a race: a random, growing pause, or 20 greenlets decrementing
                    # at once can starve one of them for 20 rounds.
                    gevent.sleep(random.random() * min(0.05, 0.0005 * 2 ** attempt))
                data, token = conn.call(server, "gets", lambda c: c.gets(mkey))
                if data is None:
                    if self._add_raw(conn, mkey, delta, ttl):
                        return delta
                    continue  # somebody created it meanwhile: start over from theirs
                value = self._decode(key, data)
                if value is not MISS and type(value) is not int:
                    event(log, logging.WARNING, "increment_refused",
                          f"increment of key {key_hash(key)} refused: memcached holds a "
                          f"{type(value).__name__} there, not an integer", key=key)
                    return None
                new = (value if isinstance(value, int) else 0) + delta
                if delta >= 0 and _counter_bytes(data) is not None and new <= _COUNTER_MAX:
                    result = conn.call(server, "incr", lambda c: c.incr(mkey, delta))
                    if result is not None:
                        return int(result)
                    continue  # deleted or expired since our gets
                if self._cas(conn, key, self._encode(new), token, ttl):
                    return new
        event(log, logging.WARNING, "increment_gave_up",
              f"increment of key {key_hash(key)} gave up after {_CAS_ATTEMPTS} attempts: "
              "other writers kept changing the value", key=key)
        return None

    def _add_raw(self, conn: Connection, mkey: bytes, value: int, ttl: float | None) -> bool:
        data = self._encode(value)
        return bool(conn.call(conn.server_for(mkey), "add",
                              lambda c: c.add(mkey, data, expire_time(ttl))))

    # -- encoding and large values -------------------------------------------------------

    @staticmethod
    def _encode(value: Any) -> bytes:
        """Bare digits for a counter-shaped int, else the codec's format.

        :raises CodecError: the codec refuses the value.
        """
        if _is_counter(value):
            return str(value).encode("ascii")
        # A large value's parts are joined off the hub (the join may yield: no caller
        # holds a connection yet).
        return codec.encode(value, chunks.join)

    def _prepare(self, conn: Connection, key: str, data: bytes,
                 ttl: float | None) -> tuple[bytes, bytes]:
        """The memcached key and the bytes to store under it (a manifest for a large value,
        whose chunks this writes first: see :mod:`service.chunks`)."""
        if len(data) > self.chunk_size:
            if expire_time(ttl) < 0:
                # Stored already expired: nobody can read it, so write no chunks; a small
                # item still replaces (and so hides) the previous value, as set() should.
                data = codec.header(codec.KIND_BYTES)
            else:
                data = chunks.write_chunks(conn, self.key, key, data, ttl, self.chunk_size)
        return self.key(key), data
