"""The memcached store: logical keys and Python values in, legal keys and safe bytes out.

This is the thin adapter every higher layer uses (the Flask-Caching backend, the
two-tier cache, leases, counters). It maps keys with :mod:`service.keys`, encodes values
with :mod:`service.codec`, splits values larger than memcached's item size over several
items, and talks through a pooled :class:`~service.clients.Connection`.

Failures of memcached itself surface as :class:`~service.errors.CacheUnavailable` (raised
by the connection, the one error boundary); a value that does not decode is a miss,
logged and counted, and never raises.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from operator import methodcaller
from typing import Any, Final

import orjson

from . import codec, metrics
from .clients import ClientPool, Connection, borrow
from .errors import CodecError
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

_THIRTY_DAYS = 30 * 24 * 3600
# Room for the item header, key and flags inside memcached's item size limit.
_ITEM_OVERHEAD = 512


def expire_time(ttl: float | None) -> int:
    """memcached's ``exptime`` for a TTL in seconds: 0 means never, and anything over
    30 days must be sent as an absolute Unix time (memcached's rule)."""
    if not ttl or ttl <= 0:
        return 0
    seconds = math.ceil(ttl)
    return seconds if seconds <= _THIRTY_DAYS else int(time.time()) + seconds


class Store:
    """Typed memcached operations for one namespace.

    :param settings: the ``[cache]`` settings (prefix, item size).
    :param connection: returns the connection to use now; in a request that is the one
        on ``flask.g``.
    """

    def __init__(self, pool: ClientPool, namespace: str, item_size_max: int) -> None:
        self.prefix = namespace
        self.chunk_size = max(1024, item_size_max - _ITEM_OVERHEAD)
        self._pool = pool

    def key(self, key: str) -> bytes:
        return memcached_key(self.prefix, key)

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        """The value under ``key``, or :data:`MISS`."""
        return self.gets(key)[0]

    def gets(self, key: str) -> tuple[Any, bytes | None]:
        """The value and its CAS token, or ``(MISS, None)`` when absent."""
        mkey = self.key(key)
        with borrow(self._pool) as conn:
            server = conn.server_for(mkey)
            data, token = conn.call(server, "gets", lambda c: c.gets(mkey))
            if data is None:
                return MISS, None
            return self._decode(key, data, conn), token

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values found, by key; absent or undecodable keys are left out."""
        by_mkey = {self.key(k): k for k in keys}
        with borrow(self._pool) as conn:
            found: dict[str, Any] = {}
            for server, mkeys in conn.by_server(by_mkey).items():
                raw: dict[bytes, bytes] = conn.call(server, "get_many",
                                                    methodcaller("get_many", mkeys))
                for mkey, data in raw.items():
                    value = self._decode(by_mkey[mkey], data, conn)
                    if value is not MISS:
                        found[by_mkey[mkey]] = value
            return found

    def _decode(self, key: str, data: bytes, conn: Connection) -> Any:
        try:
            if codec.kind_of(data) == codec.KIND_CHUNKED:
                data = self._read_chunks(key, data, conn)
            return codec.decode(data)
        except CodecError as exc:
            # Someone else's bytes (another app, an old release, an attacker's pickle):
            # never executed, only counted and read as a miss.
            metrics.memcached_errors_total.labels("decode").inc()
            log.warning("undecodable value under %s: %s", self.key(key).decode(), exc)
            return MISS

    # -- writes --------------------------------------------------------------------------

    def set(self, key: str, value: Any, ttl: float | None = None) -> bool:
        mkey, data = self._prepare(key, value, ttl)
        with borrow(self._pool) as conn:
            return bool(conn.call(conn.server_for(mkey), "set",
                                  lambda c: c.set(mkey, data, expire_time(ttl))))

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        """Store only if absent; ``False`` when the key exists (never lies: no noreply)."""
        mkey, data = self._prepare(key, value, ttl)
        with borrow(self._pool) as conn:
            return bool(conn.call(conn.server_for(mkey), "add",
                                  lambda c: c.add(mkey, data, expire_time(ttl))))

    def cas(self, key: str, value: Any, token: bytes, ttl: float | None = None) -> bool | None:
        """Store only if unchanged since ``gets`` gave ``token``.

        :return: ``True`` stored, ``False`` someone wrote in between, ``None`` the key
            is gone.
        """
        mkey, data = self._prepare(key, value, ttl)
        with borrow(self._pool) as conn:
            result = conn.call(conn.server_for(mkey), "cas",
                               lambda c: c.cas(mkey, data, token, expire_time(ttl)))
            return None if result is None else bool(result)

    def set_many(self, mapping: Mapping[str, Any], ttl: float | None = None) -> list[str]:
        """Store several values; returns the keys that were not stored."""
        failed = []
        for key, value in mapping.items():
            if not self.set(key, value, ttl):
                failed.append(key)
        return failed

    def delete(self, key: str) -> bool:
        mkey = self.key(key)
        with borrow(self._pool) as conn:
            return bool(conn.call(conn.server_for(mkey), "delete", lambda c: c.delete(mkey)))

    def delete_if(self, key: str, expected: Any) -> bool:
        """Delete ``key`` only while it still holds ``expected``: read, compare, then
        memcached's compare-and-delete (meta ``md <key> C<cas>``, memcached >= 1.6).

        If anybody replaced the value after our ``gets`` the delete does nothing. (A
        CAS-written short-lived tombstone is not a substitute: memcached expires items on
        whole-second ticks, so a "1 s" tombstone can vanish at once and let a plain
        delete remove somebody else's value.)

        :raises CacheUnavailable: memcached could not be asked, or does not know meta
            commands (older than 1.6).
        """
        value, token = self.gets(key)
        if value is MISS or value != expected or token is None:
            return False
        mkey = self.key(key)
        with borrow(self._pool) as conn:
            answer = conn.call(conn.server_for(mkey), "md",
                               methodcaller("raw_command", b"md " + mkey + b" C" + token))
            return bool(answer == b"HD")  # EX: changed since our gets; NF: already gone

    def incr(self, key: str, delta: int = 1) -> int | None:
        """Atomically add ``delta`` to a counter created with :meth:`add_counter`."""
        mkey = self.key(key)
        with borrow(self._pool) as conn:
            result = conn.call(conn.server_for(mkey), "incr", lambda c: c.incr(mkey, delta))
            return None if result is None else int(result)

    def add_counter(self, key: str, initial: int = 0) -> bool:
        """Create a counter (memcached's ``incr`` needs plain decimal digits)."""
        mkey = self.key(key)
        with borrow(self._pool) as conn:
            return bool(conn.call(conn.server_for(mkey), "add",
                                  lambda c: c.add(mkey, str(initial).encode("ascii"), 0)))

    def get_counter(self, key: str) -> int | None:
        mkey = self.key(key)
        with borrow(self._pool) as conn:
            data = conn.call(conn.server_for(mkey), "get", lambda c: c.get(mkey))
            try:
                return int(data) if data is not None else None
            except ValueError:
                return None

    # -- large values --------------------------------------------------------------------

    def _prepare(self, key: str, value: Any, ttl: float | None) -> tuple[bytes, bytes]:
        data = codec.encode(value)
        if len(data) > self.chunk_size:
            data = self._write_chunks(key, data, ttl)
        return self.key(key), data

    def _chunk_key(self, key: str, chunk_set: str, index: int) -> str:
        return f"{key}\x00chunk\x00{chunk_set}\x00{index}"

    def _write_chunks(self, key: str, data: bytes, ttl: float | None) -> bytes:
        """Write the pieces of a large value and return the manifest to store under key.

        The chunk set has a random id, so two writers of one key never mix pieces; the
        manifest is written last (by the caller), so a reader never sees a partial set.
        """
        chunk_set = os.urandom(8).hex()
        pieces = [data[i : i + self.chunk_size] for i in range(0, len(data), self.chunk_size)]
        with borrow(self._pool) as conn:
            # Chunks outlive the manifest slightly, so a manifest never points at evicted
            # pieces merely because of expiry; an evicted piece still reads as a miss.
            exp = expire_time(ttl + 60 if ttl else None)
            for index, piece in enumerate(pieces):
                ckey = self.key(self._chunk_key(key, chunk_set, index))
                conn.call(conn.server_for(ckey), "set", methodcaller("set", ckey, piece, exp))
            metrics.large_values_total.labels("chunked").inc()
            manifest = {
                "id": chunk_set, "n": len(pieces), "len": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            return codec.header(codec.KIND_CHUNKED) + orjson.dumps(manifest)

    def _read_chunks(self, key: str, data: bytes, conn: Connection) -> bytes:
        try:
            manifest = orjson.loads(data[codec.HEADER_LEN :])
            chunk_set, count = str(manifest["id"]), int(manifest["n"])
            length, digest = int(manifest["len"]), str(manifest["sha256"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"bad chunk manifest: {exc}") from exc
        if not 0 < count <= 4096:
            raise CodecError(f"bad chunk count {count}")
        ckeys = [self.key(self._chunk_key(key, chunk_set, i)) for i in range(count)]
        found: dict[bytes, bytes] = {}
        for server, group in conn.by_server(ckeys).items():
            found.update(conn.call(server, "get_many", methodcaller("get_many", group)))
        if len(found) != count:
            raise CodecError(f"{count - len(found)} of {count} chunks are gone")
        whole = b"".join(found[k] for k in ckeys)
        if len(whole) != length or hashlib.sha256(whole).hexdigest() != digest:
            raise CodecError("chunks do not match their manifest")
        return whole
