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
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import CacheUnavailable, CodecError, HTTPError
from ..memcache import codec
from ..memcache.store import EMPTY, MISS, Got, KeyValue
from ..observe import metrics
from ..observe.logs import event, key_hash
from .entry import Entry
from .lease import Claim, error_of, is_pass

log = logging.getLogger(__name__)


# What one local entry costs beyond its encoded value: the key, the envelope, the dict
# and LRU links. An estimate; it keeps a tier of tiny values from growing without bound.
ENTRY_OVERHEAD = 400
# A value larger than this fraction of l1_max_bytes is not kept locally: one of them would
# evict a large part of the tier. It is still served from memcached.
LARGEST_FRACTION = 8
# How long an invalidation's mark stays in memcached (see TwoTier.epoch): memcached's
# longest relative expiry, so it outlives any copy a stale-if-error window still allows.
FORGOTTEN_TTL = 30 * 24 * 3600.0
# How far (seconds) a writer's stamp may stray from the age memcached's own clock gives an
# entry before the server's figure wins: memcached counts TTLs in whole seconds.
AGE_SLACK = 1.5


@dataclass
class LocalCopy:
    entry: Entry        # with value=None; the value lives encoded in blob
    blob: bytes
    checked_at: float   # monotonic time memcached last confirmed (or supplied) this copy
    size: int = 0       # bytes counted against l1_max_bytes
    # The answer a front door rendered from this entry (body, status, headers without the
    # per-request ones), kept for the WSGI fast path (service.fastpath). Immutable, so
    # requests may share it; it goes with the entry when a new one is put.
    rendered: Any = None
    cas: bytes | None = None  # memcached's CAS of the item this copy was read from

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
        self._items: OrderedDict[str, LocalCopy] = OrderedDict()

    def get(self, key: str) -> LocalCopy | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def peek(self, key: str) -> LocalCopy | None:
        """The item without touching the LRU order (the fast path's look-up)."""
        return self._items.get(key)

    def put(self, key: str, entry: Entry, checked_at: float, cas: bytes | None = None,
            size_hint: int = 0) -> None:
        """Keep ``entry``; ``size_hint`` (its length as memcached holds it, when known)
        turns a large value away before encoding it again only to find it too large."""
        if self.max_entries <= 0 or self.max_bytes <= 0:
            return
        if size_hint > self.max_bytes // LARGEST_FRACTION:
            self.delete(key)  # an older, smaller copy must not outlive this read
            return
        blob = codec.encode(entry.value)
        size = len(blob) + len(key) + ENTRY_OVERHEAD
        if size > self.max_bytes // LARGEST_FRACTION:
            self.delete(key)  # an older, smaller copy must not outlive this write
            return
        self.delete(key)
        self._items[key] = LocalCopy(dataclasses.replace(entry, value=None), blob, checked_at,
                                  size, cas=cas)
        self.bytes += size
        self._evict()

    def attach(self, key: str, item: LocalCopy, rendered: Any, size: int) -> None:
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


@dataclass(frozen=True)
class Look:
    """What one read of both tiers found.

    :param found: an entry to decide on (from L1 within ``l1_ttl``, memcached, or the
        last good local copy while memcached is down), or ``None``.
    :param cas: the CAS of memcached's item under the key, whatever it holds.
    :param claim: this read won the key's cold claim (its item was missing).
    :param held: another worker holds the key's cold claim.
    :param error: the key's last fetch failed and that is remembered.
    :param passing: the key's last answer was not storable: compute without coalescing.
    :param unusable: memcached holds something under the key that is no usable entry
        (garbage, an envelope past its windows).
    """

    found: Found | None = None
    cas: bytes | None = None
    claim: Claim | None = None
    held: bool = False
    error: HTTPError | None = None
    passing: bool = False
    unusable: bool = False
    down: bool = False


class TwoTier:
    """Reads through both tiers; writes entries fenced by a claim's CAS.

    :param store: the memcached store of one namespace (the SWR entries', or the
        Flask-Caching backend's).
    :param monotonic: clock for ``l1_ttl`` (a fake one in tests).
    :param clock: wall clock, to turn memcached's remaining TTL into this host's terms.
    :param server_ages: let memcached's clock bound an entry's age from above too (see
        :meth:`rebase`); by default unless ``clock`` says otherwise (a test's fake clock,
        which moves where memcached's cannot follow, has ``server_ages = False``).
    """

    def __init__(self, store: KeyValue, local: LocalTier, l1_ttl: float,
                 monotonic: Callable[[], float],
                 clock: Callable[[], float] = time.time,
                 server_ages: bool | None = None) -> None:
        self.store = store
        self.local = local
        self.l1_ttl = l1_ttl
        self.monotonic = monotonic
        self.clock = clock
        # Invalidation epochs: a family of their own, each on its entry's server.
        self.marks = store.child("forgot", follow=True)
        if server_ages is None:
            server_ages = bool(getattr(clock, "server_ages", True))
        self.server_ages = server_ages

    def read(self, key: str) -> Found | None:
        """The entry for ``key`` from the nearest tier that may answer, or ``None``."""
        return self.look(key).found

    def look(self, key: str, vivify: float | None = None) -> Look:
        """Read ``key``: this worker's copy while memcached confirmed it less than
        ``l1_ttl`` ago, else memcached (one ``mg``; with ``vivify``, a miss there takes
        the key's cold claim for that many seconds)."""
        now = self.monotonic()
        item = self.local.get(key)
        if item is not None and now - item.checked_at < self.l1_ttl:
            metrics.tier_hits_total.labels("l1").inc()
            return Look(Found(item.materialize(), "l1", item.cas), cas=item.cas)
        try:
            got = self.store.mget(key, vivify)
        except CacheUnavailable:
            # memcached is down, slow or frozen: the last good local copy is better than
            # nothing; the freshness policy decides whether it may still be served. A copy
            # memcached already said it no longer has is only a fallback for a failed fetch.
            if item is not None and item.checked_at != float("-inf"):
                return Look(Found(item.materialize(), "l1", degraded=True), down=True)
            return Look(down=True)
        look = self.classify(key, got)
        if look.found is not None:
            own = self._newer_own_copy(key, item, look.found)
            if own is not None:
                return own
            self.local.put(key, look.found.entry, now, look.found.cas, got.size)
        else:
            # Absent or replaced: expired, evicted, flushed or invalidated. Do not keep
            # serving the local copy past l1_ttl, or an invalidation would never reach
            # this worker; keep it only as the last good copy (see last_good).
            self.local.retire(key)
        return look

    def _newer_own_copy(self, key: str, item: LocalCopy | None, found: Found) -> Look | None:
        """This worker's own copy instead of memcached's older one, written back over it.

        A copy this worker computed without sharing it (its key's server could not be
        asked: down, frozen, or cut off from this host only) may be newer than the one
        memcached holds when the server answers again. Taking memcached's would send this
        worker's readers back in time. Both ages are on this host's clock (the copy's own
        stamp, and memcached's rebased by :meth:`rebase`), so no two clocks are compared.
        The write-back is fenced on the CAS just read: a refresh or an invalidation that
        lands in between wins, and the copy is still answered this once (it is newer than
        what was read). A copy of another epoch than memcached's never wins: an
        invalidation may lie between them.
        """
        if item is None or item.cas is not None or item.checked_at == float("-inf"):
            return None             # read from or written to memcached: not our own
        if item.entry.epoch != found.entry.epoch:
            return None
        if item.entry.stored_at <= found.entry.stored_at + AGE_SLACK:
            return None
        entry = item.materialize()
        now = self.monotonic()
        try:
            stored = self.store.mset(key, entry.to_wire(), entry.ttl(self.clock()),
                                     cas=found.cas)
        except CacheUnavailable:
            return Look(Found(entry, "l1", degraded=True), cas=found.cas)
        if stored.ok:
            event(log, logging.INFO, "own_copy_shared",
                  f"this worker's own copy of key {key_hash(key)}, newer than memcached's "
                  f"(computed while its server could not be asked), written back", key=key)
            self.local.put(key, entry, now, stored.cas)
            return Look(Found(entry, "memcached", stored.cas), cas=stored.cas)
        return Look(Found(entry, "l1"), cas=found.cas)

    def look_shared(self, key: str, vivify: float | None = None) -> Look:
        """Like :meth:`look`, but always asks memcached (a loader re-reading, a waiter).

        :raises CacheUnavailable: memcached could not be asked.
        """
        got = self.store.mget(key, vivify)
        look = self.classify(key, got)
        if look.found is not None:
            self.local.put(key, look.found.entry, self.monotonic(), look.found.cas, got.size)
        return look

    def classify(self, key: str, got: Got) -> Look:
        """What ``got`` (memcached's answer for ``key``) means to the read path."""
        value = got.value
        if value is EMPTY:
            if got.won:
                metrics.lease_total.labels("acquired").inc()
                return Look(cas=got.cas, claim=Claim(key, got.cas))
            if got.ttl == -1:
                # Nobody's claim: every claim is created with an expiry. Without this, an
                # empty item written by hand would make readers wait for no holder.
                return Look(cas=got.cas, unusable=True)
            return Look(cas=got.cas, held=True)
        if value is MISS:
            return Look(cas=got.cas, unusable=got.cas is not None)
        error = error_of(value)
        if (error is not None or is_pass(value)) and got.ttl == -1:
            # Every record we write expires; one that never does is somebody's garbage,
            # and would answer 502 (or pass) for ever.
            return Look(cas=got.cas, unusable=True)
        if error is not None:
            return Look(cas=got.cas, error=error)
        if is_pass(value):
            return Look(cas=got.cas, passing=True)
        try:
            entry = Entry.from_wire(value)
        except CodecError as exc:
            metrics.memcached_errors_total.labels("decode").inc()
            event(log, logging.WARNING, "not_an_entry",
                  f"memcached holds something that is not a cache entry (key "
                  f"{key_hash(key)}), read as a miss: {exc}", key=key)
            return Look(cas=got.cas, unusable=True)
        metrics.tier_hits_total.labels("memcached").inc()
        return Look(Found(self.rebase(entry, got.ttl), "memcached", got.cas), cas=got.cas)

    def rebase(self, entry: Entry, ttl: int | None) -> Entry:
        """``entry`` with its age taken from memcached's clock, in this host's terms.

        The writer stamped ``stored_at`` with its own clock, which another host's may be
        seconds or minutes away from. memcached counts the item's remaining TTL on its
        own clock, and the item was written to live for the entry's whole lifetime, so
        ``lifetime - ttl`` is its age to within the server's one-second tick. The
        writer's stamp is kept where it agrees to within :data:`AGE_SLACK` (it is finer);
        otherwise the server's age wins. So no decision compares two hosts' clocks.
        """
        lifetime = entry.windows.lifetime
        if ttl is None or ttl < 0 or lifetime <= 0:
            return entry
        now = self.clock()
        server_age = max(0.0, math.ceil(lifetime) - ttl)
        age = now - entry.stored_at
        if age < server_age - AGE_SLACK:
            age = server_age      # the writer's clock runs ahead of ours: never younger
        elif self.server_ages and age > server_age + AGE_SLACK:
            age = server_age      # ours runs ahead of the writer's: never older either
        else:
            return entry
        stored_at = now - age
        return dataclasses.replace(entry, timing=dataclasses.replace(
            entry.timing, stored_at=stored_at))

    def last_good(self, key: str) -> Entry | None:
        """This worker's last copy of ``key``, even one memcached no longer has (it was
        flushed, evicted, or its server restarted empty): what may still be answered
        instead of waiting (a lost entry) or failing (stale-if-error). Not a copy of a key
        invalidated since it was stored, here (the copy is gone) or by any other worker
        or host (the key's mark names a newer epoch than the copy's: asked here, on this
        rare path only)."""
        item = self.local.get(key)
        if item is None:
            return None
        entry = item.materialize()
        try:
            mark = self.epoch(key)
        except CacheUnavailable:
            return entry  # memcached is down as well: the copy is all we have
        if mark and mark != entry.epoch:
            self.local.delete(key)
            return None
        return entry

    def epoch(self, key: str) -> str:
        """The key's invalidation epoch: a random name written by each invalidation
        (``""``: never invalidated, as far as memcached remembers). An entry carries the
        epoch it was computed in; a copy whose epoch is not the current one predates an
        invalidation and is never answered again. Names, not times: no clocks compared.

        :raises CacheUnavailable: memcached could not be asked.
        """
        mark = self.marks.mget(key).value
        return mark if isinstance(mark, str) else ""

    def read_shared(self, key: str) -> Found | None:
        """Read memcached only (the tier every worker and host shares).

        :raises CacheUnavailable: memcached could not be asked.
        """
        return self.classify(key, self.store.mget(key)).found

    def write(self, key: str, entry: Entry, claim: Claim | None) -> str:
        """Store a new entry under ``claim``: only while the key's item still has the
        claim's CAS. ``"HD"`` stored; ``"EX"`` somebody wrote (or invalidated and
        another stored) since; ``"NF"`` the item is gone: invalidated, or the claim
        lapsed. A write that lost its claim is dropped, never turned into an add: it
        would undo an invalidation. Without a claim (memcached could not be asked when
        the load began) only this worker's tier gets the entry.

        :raises CacheUnavailable: memcached could not be asked (the local tier still
            got the entry).
        """
        if claim is None or claim.fence is None:
            self.local.put(key, entry, self.monotonic())
            return "NF"
        try:
            stored = self.store.mset(key, entry.to_wire(), entry.ttl(entry.stored_at),
                                     cas=claim.fence)
        except CacheUnavailable:
            self.local.put(key, entry, self.monotonic())
            raise
        if stored.ok:
            claim.fence = stored.cas
            self.local.put(key, entry, self.monotonic(), stored.cas, stored.size)
        else:
            self.local.delete(key)  # newer, or invalidated: read memcached next time
        return stored.code

    def delete(self, key: str, at: float | None = None) -> None:
        """Forget ``key`` here and in memcached (see :meth:`forget_shared`).

        :raises CacheUnavailable: memcached could not be asked (the local copy is gone).
        """
        self.local.delete(key)
        self.forget_shared(key)

    def forget_shared(self, key: str, at: float | None = None) -> None:
        """Delete ``key`` from memcached under a new invalidation epoch (:meth:`epoch`),
        so that no worker's last good copy from before is served again. The mark is
        written first: if the delete then fails the entry stays for now, but no old copy
        outlives the invalidation. The delete also kills a fetch in flight: its fenced
        write finds the item gone and is dropped.

        :raises CacheUnavailable: memcached could not be asked.
        """
        self.marks.mset(key, os.urandom(8).hex(), FORGOTTEN_TTL)
        self.store.mdelete(key)
