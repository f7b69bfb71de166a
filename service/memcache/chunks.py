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
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from operator import methodcaller

import orjson

from ..errors import CodecError
from ..observe import metrics
from . import codec
from .connection import Connection
from .expiry import expire_time

MAX_PIECES = 4096
# How much longer the pieces live than their manifest.
_PIECES_OUTLIVE_MANIFEST = 60

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
    pieces = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    # Chunks outlive the manifest slightly, so a manifest never points at evicted
    # pieces merely because of expiry; an evicted piece still reads as a miss.
    exp = expire_time(ttl + _PIECES_OUTLIVE_MANIFEST if ttl else None)
    for index, piece in enumerate(pieces):
        ckey = key_of(_chunk_key(key, chunk_set, index))
        conn.call(conn.server_for(ckey), "set", methodcaller("set", ckey, piece, exp))
    metrics.large_values_total.labels("chunked").inc()
    manifest = {
        "id": chunk_set, "n": len(pieces), "len": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return codec.header(codec.KIND_CHUNKED) + orjson.dumps(manifest)


def read_chunks(conn: Connection, key_of: KeyOf, key: str, manifest_bytes: bytes) -> bytes:
    """The whole value that the manifest ``manifest_bytes``, read under ``key``, describes.

    :raises CodecError: a malformed manifest, a missing piece, or pieces that do not match
        the manifest's length and SHA-256 (the caller counts it and reads a miss).
    :raises CacheUnavailable: memcached failed.
    """
    try:
        manifest = orjson.loads(manifest_bytes[codec.HEADER_LEN :])
        chunk_set, count = str(manifest["id"]), int(manifest["n"])
        length, digest = int(manifest["len"]), str(manifest["sha256"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"bad chunk manifest: {exc}") from exc
    if not 0 < count <= MAX_PIECES:
        raise CodecError(f"bad chunk count {count}")
    ckeys = [key_of(_chunk_key(key, chunk_set, i)) for i in range(count)]
    found: dict[bytes, bytes] = {}
    for server, group in conn.by_server(ckeys).items():
        found.update(conn.call(server, "get_many", methodcaller("get_many", group)))
    if len(found) != count:
        raise CodecError(f"{count - len(found)} of {count} chunks are gone")
    whole = b"".join(found[k] for k in ckeys)
    if len(whole) != length or hashlib.sha256(whole).hexdigest() != digest:
        raise CodecError("chunks do not match their manifest")
    return whole
