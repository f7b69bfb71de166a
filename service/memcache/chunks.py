"""Values larger than memcached's item size, split over several items.

memcached refuses an item larger than its ``-I`` limit (1 MiB by default), so the store
writes such a value as pieces of at most ``chunk_size`` bytes plus a small manifest under
the value's own key; a reader finds the manifest (codec kind ``c``) and gathers the pieces.

The format, and why each part is there:

- The pieces live under ``<key> NUL chunk NUL <chunk-set id> NUL <index>`` (mapped to a
  memcached key by the caller's ``key_of``, so they share the value's namespace). The
  chunk-set id is random per write, so two writers of one key never mix their pieces: each
  manifest names only its own set.
- The manifest, ``codec.header(KIND_CHUNKED)`` followed by JSON
  ``{"id", "n", "len", "sha256"}``, is written last (by the store, after
  :func:`write_chunks` returns it), so a reader never sees a manifest whose pieces are not
  all written yet.
- Pieces expire 60 s after the manifest, so a live manifest never points at pieces gone
  merely by expiry. A piece can still be evicted: that, a truncated set, or pieces whose
  bytes do not match the manifest's length and SHA-256 all raise
  :class:`~service.errors.CodecError`, which the store reads as a miss.
- A manifest claims at most 4096 pieces: a corrupt or hostile one cannot make a reader
  ask for millions of keys.

Pieces of a replaced or deleted value are not deleted; they expire or are evicted.

A large value must not stall the worker's other requests, nor multiply its memory by the
number of its readers:

- Readers of one value in one worker share one read (:func:`read_value`): the first
  fetches, checks and decodes it, the others wait for that and get a value of their own
  that shares its large leaves (:class:`~service.codec.Prepared`); an error of the shared
  read reaches each of them.
- The pieces are fetched one at a time, the hub gets a turn after each, and the checksum
  grows piece by piece: no step holds the hub for longer than one piece takes.
- Pieces are joined by :func:`join`, in two threads of the worker's own when large:
  ``bytes.join`` releases the GIL for a large join, so the hub keeps serving while the
  copy runs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from operator import methodcaller
from typing import Any

import gevent
import orjson
from gevent.event import AsyncResult
from gevent.threadpool import ThreadPool

from ..errors import CacheUnavailable, CodecError
from ..observe import metrics
from . import codec
from .clients import ClientPool, borrow
from .connection import Connection
from .expiry import expire_time

MAX_PIECES = 4096
# How much longer the pieces live than their manifest.
_PIECES_OUTLIVE_MANIFEST = 60

# A join this large runs in the thread pool (bytes.join releases the GIL from 1 MiB on).
OFF_HUB = 1024 * 1024

KeyOf = Callable[[str], bytes]
"""Maps a logical key to its memcached key (a :class:`~service.store.Store`'s ``key``)."""


def _chunk_key(key: str, chunk_set: str, index: int) -> str:
    return f"{key}\x00chunk\x00{chunk_set}\x00{index}"


def write_chunks(conn: Connection, key_of: KeyOf, key: str, data: bytes, ttl: float | None,
                 chunk_size: int) -> bytes:
    """Write the pieces of a large value and return the manifest to store under ``key``.

    The caller writes the manifest itself, after this returns (see the module docstring),
    with ``ttl``; ``ttl`` must not be negative (an already-expired value needs no pieces).

    :raises CacheUnavailable: memcached failed; the pieces written so far are left to expire.
    """
    chunk_set = os.urandom(8).hex()
    # Chunks outlive the manifest slightly, so a manifest never points at evicted
    # pieces merely because of expiry; an evicted piece still reads as a miss.
    exp = expire_time(ttl + _PIECES_OUTLIVE_MANIFEST if ttl else None)
    digest = hashlib.sha256()
    count = 0
    # One piece at a time (cut, hashed, written): no step copies or hashes the whole value.
    for count, start in enumerate(range(0, len(data), chunk_size), 1):
        piece = data[start : start + chunk_size]
        digest.update(piece)
        ckey = key_of(_chunk_key(key, chunk_set, count - 1))
        conn.call(conn.server_for(ckey), "set", methodcaller("set", ckey, piece, exp))
        gevent.sleep(0)
    metrics.large_values_total.labels("chunked").inc()
    manifest = {"id": chunk_set, "n": count, "len": len(data), "sha256": digest.hexdigest()}
    return codec.header(codec.KIND_CHUNKED) + orjson.dumps(manifest)


def join(parts: list[bytes]) -> bytes:
    """``b"".join(parts)``; in this worker's joining threads when large, so that the hub
    runs meanwhile (``bytes.join`` releases the GIL for the copy)."""
    if len(parts) > 1 and sum(map(len, parts)) >= OFF_HUB:
        pool = _joiners()
        if pool is not None:
            joined: bytes = pool.apply(b"".join, (parts,))
            return joined
    return b"".join(parts)


def blake2b(data: bytes, digest_size: int) -> str:
    """The BLAKE2b hex digest of ``data``; hashed in the joining threads when large
    (hashlib releases the GIL while it hashes), so that the hub runs meanwhile."""
    pool = _joiners() if len(data) >= OFF_HUB else None
    if pool is not None:
        digest: str = pool.apply(_blake2b, (data, digest_size))
        return digest
    return _blake2b(data, digest_size)


def _blake2b(data: bytes, digest_size: int) -> str:
    return hashlib.blake2b(data, digest_size=digest_size).hexdigest()


_pool: ThreadPool | None = None
_pool_pid = 0


def _joiners() -> ThreadPool | None:
    """Two threads for large joins: a pool of their own, not the hub's, whose threads
    python sources may all hold for as long as a fetch takes. Made on first use, so in the
    worker (never at import, nor in the gunicorn master), and again after a fork; ``None``
    off the hub it was made for (a python source's thread reading a large value joins in
    its own thread, which is no hub's)."""
    global _pool, _pool_pid
    hub = gevent.get_hub()
    if _pool is None or _pool_pid != os.getpid():
        _pool, _pool_pid = ThreadPool(2, hub=hub), os.getpid()
    return _pool if _pool.hub is hub else None


def stop_joiners() -> None:
    """Stop this process's join threads, if it made them (a worker as it exits; a test
    after it): every thread we start is stopped by what started it."""
    global _pool
    pool, _pool = _pool, None
    if pool is not None and _pool_pid == os.getpid():
        pool.kill()


def _manifest(manifest_bytes: bytes) -> tuple[str, int, int, str]:
    """``(chunk-set id, pieces, length, sha256)`` of a manifest.

    :raises CodecError: a malformed manifest.
    """
    try:
        manifest = orjson.loads(manifest_bytes[codec.HEADER_LEN :])
        chunk_set, count = str(manifest["id"]), int(manifest["n"])
        length, digest = int(manifest["len"]), str(manifest["sha256"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"bad chunk manifest: {exc}") from exc
    if not 0 < count <= MAX_PIECES:
        raise CodecError(f"bad chunk count {count}")
    return chunk_set, count, length, digest


def declared_length(manifest_bytes: bytes) -> int:
    """The length of the value a manifest describes (0 when it is malformed): what a
    reader may know of a large value's size before reading it."""
    try:
        return _manifest(manifest_bytes)[2]
    except CodecError:
        return 0


def read_pieces(conn: Connection, key_of: KeyOf, key: str, manifest_bytes: bytes
                ) -> list[bytes]:
    """The pieces of the value that ``manifest_bytes``, read under ``key``, describes,
    checked against the manifest's length and SHA-256.

    :raises CodecError: a malformed manifest, a missing piece, or pieces that do not match
        the manifest (the caller counts it and reads a miss).
    :raises CacheUnavailable: memcached failed.
    """
    chunk_set, count, length, expected = _manifest(manifest_bytes)
    digest = hashlib.sha256()
    pieces: list[bytes] = []
    total = 0
    for index in range(count):
        ckey = key_of(_chunk_key(key, chunk_set, index))
        piece = conn.call(conn.server_for(ckey), "get", methodcaller("get", ckey))
        if piece is None:
            raise CodecError(f"chunk {index} of {count} is gone")
        total += len(piece)
        if total > length:
            raise CodecError("chunks do not match their manifest")
        digest.update(piece)
        pieces.append(piece)
        # One piece per turn of the loop: the worker's other requests run in between.
        gevent.sleep(0)
    if total != length or digest.hexdigest() != expected:
        raise CodecError("chunks do not match their manifest")
    return pieces


def read_chunks(conn: Connection, key_of: KeyOf, key: str, manifest_bytes: bytes) -> bytes:
    """The whole encoded value that the manifest ``manifest_bytes`` describes, joined.

    :raises CodecError: as :func:`read_pieces`.
    :raises CacheUnavailable: memcached failed.
    """
    return join(read_pieces(conn, key_of, key, manifest_bytes))


# The reads of large values in flight in this worker, by memcached key and manifest.
_flights: dict[tuple[bytes, bytes], AsyncResult] = {}


def read_value(pool: ClientPool, key_of: KeyOf, key: str, manifest_bytes: bytes) -> Any:
    """The decoded value that the manifest describes, for one reader.

    Readers of the same manifest in this worker share one read: the first fetches and
    decodes, borrowing a connection from ``pool`` for the fetch, the others wait for it
    (holding no connection; the shared read is bounded by the same timeouts as their own
    would be), then each gets a value of its own that shares the large leaves (see
    :class:`~service.codec.Prepared`).
    The manifest names its chunk set, which is random per write: readers of one manifest
    read the same bytes, and a newer write of the key is a new read.

    :raises CodecError: as :func:`read_pieces`, or the pieces do not decode; in every
        reader of the shared read.
    :raises CacheUnavailable: memcached failed during the shared read; in every reader.
    """
    flight_key = (key_of(key), manifest_bytes)
    flight = _flights.get(flight_key)
    if flight is not None:
        # Another greenlet of this worker is reading this very value: join it, rather
        # than hold a second copy of its pieces and its decoded value.
        metrics.large_values_total.labels("shared").inc()
        prepared: codec.Prepared = flight.get()
        return prepared.value()
    flight = _flights[flight_key] = AsyncResult()
    try:
        with borrow(pool) as conn:
            pieces = read_pieces(conn, key_of, key, manifest_bytes)
        prepared = codec.prepare(pieces, join)
    except (CodecError, CacheUnavailable) as exc:
        flight.set_exception(exc)
        raise
    except BaseException as exc:
        # Killed or timed out from outside: that concerns this greenlet, not the waiters.
        flight.set_exception(CacheUnavailable(
            f"the shared read of a large value was interrupted ({type(exc).__name__})"))
        raise
    else:
        flight.set(prepared)
    finally:
        del _flights[flight_key]
    return prepared.value()
