"""The two tiers: a per-worker in-process LRU in front of memcached.

A worker serves its own copy of an entry without asking memcached for at most ``l1_ttl``;
after that it re-reads memcached, so an entry refreshed by another worker or host reaches
every worker within ``l1_ttl``. The in-process tier also keeps the last good copy of each
entry: while memcached is unreachable that copy is served (stale if need be) instead of
failing, which is what makes memcached trouble not an outage.

The local tier keeps each value encoded and decodes it on every read, so two requests
never share one mutable object (a dict a view edits, a Response whose headers
``after_request`` changes).

Both tiers are touched only from greenlets of one worker, and no method here yields
between reading and updating the ``OrderedDict``, so the LRU needs no lock.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import codec, metrics
from .entry import Entry
from .errors import CacheUnavailable, CodecError
from .store import MISS, Store

log = logging.getLogger(__name__)


# What one local entry costs beyond its encoded value: the key, the envelope, the dict
# and LRU links. An estimate; it keeps a tier of tiny values from growing without bound.
ENTRY_OVERHEAD = 400
# A value larger than this fraction of l1_max_bytes is not kept locally: one of them would
# evict a large part of the tier. It is still served from memcached.
LARGEST_FRACTION = 8
# How long the mark of a forgotten key stays in memcached (see forgotten_key): memcached's
# longest relative expiry, so it outlives any copy a stale-if-error window still allows.
FORGOTTEN_TTL = 30 * 24 * 3600.0


def forgotten_key(key: str) -> str:
    """Where an invalidation leaves its time (wall clock): a worker whose last good copy
    of ``key`` is older than that never serves it again, not even when the origin fails.
    An entry merely absent from memcached could have been flushed or evicted, and then
    the copy is exactly what stale-if-error is for; only this mark tells the two apart."""
    return f"forgot\x00{key}"


@dataclass
class _Local:
    entry: Entry        # with value=None; the value lives encoded in blob
    blob: bytes
    checked_at: float   # monotonic time memcached last confirmed (or supplied) this copy
    size: int = 0       # bytes counted against l1_max_bytes
    # The answer a front door rendered from this entry (body, status, headers without the
    # per-request ones), kept for the WSGI fast path (service.fastpath). Immutable, so
    # requests may share it; it goes with the entry when a new one is put.
    rendered: Any = None

    def materialize(self) -> Entry:
        return dataclasses.replace(self.entry, value=codec.decode(self.blob))


class LocalTier:
    """A bounded LRU of entries, per worker: at most ``max_entries`` entries and about
    ``max_bytes`` bytes of encoded values (whichever bound is reached first evicts the
    least recently used). ``0`` for either disables the tier."""

    def __init__(self, max_entries: int, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, _Local] = OrderedDict()

    def get(self, key: str) -> _Local | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def peek(self, key: str) -> _Local | None:
        """The item without touching the LRU order (the fast path's look-up)."""
        return self._items.get(key)

    def put(self, key: str, entry: Entry, checked_at: float) -> None:
        if self.max_entries <= 0 or self.max_bytes <= 0:
            return
        blob = codec.encode(entry.value)
        size = len(blob) + len(key) + ENTRY_OVERHEAD
        if size > self.max_bytes // LARGEST_FRACTION:
            self.delete(key)  # an older, smaller copy must not outlive this write
            return
        self.delete(key)
        self._items[key] = _Local(dataclasses.replace(entry, value=None), blob, checked_at,
                                  size)
        self.bytes += size
        self._evict()

    def attach(self, key: str, item: _Local, rendered: Any, size: int) -> None:
        """Keep ``rendered`` with ``item`` (if ``item`` is still the entry of ``key``),
        counting ``size`` more bytes against ``max_bytes``."""
        if self._items.get(key) is not item or item.rendered is not None:
            return
        item.rendered = rendered
        item.size += size
        self.bytes += size
        self._evict()

    def _evict(self) -> None:
        while self._items and (len(self._items) > self.max_entries
                               or self.bytes > self.max_bytes):
            self.bytes -= self._items.popitem(last=False)[1].size

    def delete(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.bytes -= item.size

    def retire(self, key: str) -> None:
        """Keep the copy only as a last resort: never served again without asking
        memcached first (see :meth:`TwoTier.last_good`)."""
        item = self._items.get(key)
        if item is not None:
            item.checked_at = float("-inf")

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Found:
    entry: Entry
    tier: str                       # "l1" or "memcached"
    cas: bytes | None = None        # memcached's CAS token, when read from memcached
    degraded: bool = False          # memcached failed; this is the last good local copy


class TwoTier:
    """Reads through both tiers and writes entries fenced by memcached's CAS.

    :param store: the memcached store (the Flask-Caching backend's).
    :param monotonic: clock for ``l1_ttl`` (a fake one in tests).
    """

    def __init__(self, store: Store, local: LocalTier, l1_ttl: float,
                 monotonic: Callable[[], float]) -> None:
        self.store = store
        self.local = local
        self.l1_ttl = l1_ttl
        self.monotonic = monotonic

    def read(self, key: str) -> Found | None:
        """The entry for ``key`` from the nearest tier that may answer, or ``None``."""
        now = self.monotonic()
        item = self.local.get(key)
        if item is not None and now - item.checked_at < self.l1_ttl:
            metrics.tier_hits_total.labels("l1").inc()
            return Found(item.materialize(), "l1")
        try:
            found = self.read_shared(key)
        except CacheUnavailable:
            # memcached is down, slow or frozen: the last good local copy is better than
            # nothing; the freshness policy decides whether it may still be served.
            if item is not None:
                return Found(item.materialize(), "l1", degraded=True)
            return None
        if found is None:
            # Absent from memcached: expired, evicted, flushed or invalidated. Do not keep
            # serving the local copy past l1_ttl, or an invalidation would never reach
            # this worker; keep it only as the last good copy for when the origin fails.
            self.local.retire(key)
            return None
        self.local.put(key, found.entry, now)
        return found

    def last_good(self, key: str) -> Entry | None:
        """This worker's last copy of ``key``, even one memcached no longer has (it was
        flushed, evicted, or its server restarted empty): what stale-if-error may still
        answer when the origin fails. Not a copy of a key invalidated since it was
        stored, here (the copy is gone) or by any other worker or host (its mark is in
        memcached: asked here, on this rare path only)."""
        item = self.local.get(key)
        if item is None:
            return None
        entry = item.materialize()
        try:
            mark = self.store.get(forgotten_key(key))
        except CacheUnavailable:
            return entry  # memcached is down as well as the origin: the copy is all we have
        if (isinstance(mark, (int, float)) and not isinstance(mark, bool)
                and entry.stored_at <= mark):
            self.local.delete(key)
            return None
        return entry

    def read_shared(self, key: str) -> Found | None:
        """Read memcached only (the tier every worker and host shares).

        :raises CacheUnavailable: memcached could not be asked.
        """
        raw, token = self.store.gets(key)
        if raw is MISS:
            return None
        try:
            entry = Entry.from_wire(raw)
        except CodecError as exc:
            metrics.memcached_errors_total.labels("decode").inc()
            log.warning("not a cache entry under %s: %s", self.store.key(key).decode(), exc)
            return None
        metrics.tier_hits_total.labels("memcached").inc()
        return Found(entry, "memcached", token)

    def write(self, key: str, entry: Entry, cas: bytes | None, now: float) -> bool:
        """Store a new entry unless somebody stored another since ``cas`` was read.

        This is the fence: a refresher that lost its lease (it stalled, the lease key
        was evicted) and finishes after a newer holder wrote must not overwrite the newer
        value. With a token from ``gets``, ``cas`` fails if the item changed; without one
        (the key was absent), ``add`` fails if anybody created it meanwhile.

        :return: ``True`` if our entry is now in memcached.
        :raises CacheUnavailable: memcached could not be asked (the local tier still
            got the entry).
        """
        wire = entry.to_wire()
        ttl = entry.ttl(now)
        try:
            stored = None
            if cas is not None:
                # None: the item expired or was deleted since our gets, so there is
                # nothing newer to protect and add() below decides.
                stored = self.store.cas(key, wire, cas, ttl)
            if stored is None:
                stored = self.store.add(key, wire, ttl)
            if not stored:
                stored = self._replace_unusable(key, wire, ttl)
        except CacheUnavailable:
            self.local.put(key, entry, self.monotonic())
            raise
        if stored:
            self.local.put(key, entry, self.monotonic())
        else:
            self.local.delete(key)  # a newer entry is in memcached: read that one next
        return stored

    def _replace_unusable(self, key: str, wire: Any, ttl: float) -> bool:
        """The fence said no: if what holds the key is not an entry we can use (garbage,
        another program's bytes, an envelope with hostile fields, a manifest whose chunks
        were evicted), nothing newer is being protected: replace it. Without this, one
        unusable item disables caching for its key until it expires (forever with
        exptime 0): every read is a miss and every write loses the fence."""
        raw, token = self.store.gets(key)
        if token is None or (raw is not MISS and _usable(raw)):
            return False  # gone (the next write adds it), or a real newer entry
        metrics.memcached_errors_total.labels("replaced").inc()
        return bool(self.store.cas(key, wire, token, ttl))

    def delete(self, key: str, at: float) -> None:
        """Forget ``key`` here and in memcached (see :meth:`forget_shared`).

        :raises CacheUnavailable: memcached could not be asked (the local copy is gone).
        """
        self.local.delete(key)
        self.forget_shared(key, at)

    def forget_shared(self, key: str, at: float) -> None:
        """Delete ``key`` from memcached, marking it forgotten at ``at`` (wall clock) so
        that no worker's last good copy from before then is served again
        (:meth:`last_good`). The mark is written first: if the delete then fails, the
        entry stays for now, but no old copy outlives the invalidation.

        :raises CacheUnavailable: memcached could not be asked.
        """
        self.store.set(forgotten_key(key), at, FORGOTTEN_TTL)
        self.store.delete(key)


def _usable(raw: Any) -> bool:
    try:
        Entry.from_wire(raw)
    except CodecError:
        return False
    return True
