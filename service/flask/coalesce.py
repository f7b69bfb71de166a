"""Herd protection for unchanged Flask-Caching code: the backend's read-through protocol.

Flask-Caching's ``@cache.cached`` and ``@cache.memoize`` do ``get``; on ``None`` they run
the function and ``set`` the result. With this backend that ``get`` is where the fleet
coordinates, using the read path's own claims (:mod:`service.lease`: the entry's own item on a miss,
the lease beside a stale entry), fenced writes and metrics:

* a ``get`` that finds nothing wins the key's claim (memcached's ``mg … N``) and answers
  ``None``: this caller recomputes, and its ``set`` replaces the claim, fenced on its CAS;
* a ``get`` that finds another caller's claim waits for that caller's value (bounded)
  and answers it: one recompute, not one per waiting client. If the claim lapses with
  nothing stored, the next ``get`` wins it;
* with ``CACHE_STALE_WHILE_REVALIDATE = N``, an expired entry is answered for N more
  seconds to everybody but the one caller that got its lease, who recomputes it;
* with ``CACHE_STALE_IF_ERROR = M``, for M more seconds after that, as long as a
  recompute fails: callers wait for the recomputing one, and get the old value if it
  fails.

A caller that took a claim and never stores (its function raised, ``abort()``-ed, or
its answer was not cacheable) gives it back when its app context ends
(``teardown_appcontext``): a cold claim becomes a pass record, so the waiters recompute
at once and nobody queues behind an uncacheable answer (hit-for-miss, for a few seconds);
a stale entry's lease remembers the failure for ``error_ttl``, so the stale-if-error
window serves the old value meanwhile. A claim is renewed while its caller recomputes,
however long that takes. Outside an app context (a script, a scheduler's job, a bare
greenlet) nothing would give a claim back, and every other worker would wait out
``lock_lease`` for a value that may never come: there ``get`` still waits for a holder's
value, but never claims itself. A miss answers ``None`` and its caller recomputes, as with plain
Flask-Caching.

Plain ``cache.get``/``cache.set`` keep their contract: ``get`` answers a stored value or
``None``, ``set`` stores; the only visible change is fewer recomputes. Values are stored
in the read path's envelope (``service.entry``) so that they can be served stale;
integers (counters) and values stored forever stay plain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
from flask import g, has_app_context

from ..config import RefreshSettings
from ..errors import CacheUnavailable, CodecError, OriginError
from ..memcache.store import EMPTY, MISS, Store
from ..observe import metrics
from ..readpath.entry import Entry
from ..readpath.freshness import State, Timing, Windows, state
from ..readpath.lease import (
    PASS_RECORD,
    Claim,
    Leases,
    error_of,
    error_record,
    is_pass,
    renew_every,
)
from ..readpath.tiers import LocalTier, TwoTier
from ..readpath.waiting import poll_delays

log = logging.getLogger(__name__)
SOURCE = "flask-caching"
PASS_TTL = 5.0
"""Seconds a key whose recompute stored nothing is not coalesced (hit-for-miss)."""
_HELD = "_swr_claims"


@dataclass
class _Held:
    claim: Claim
    renewer: Any  # the greenlet renewing the claim while the caller recomputes


class Coalescer:
    """See the module docstring. One per backend; ``clock`` is wall time (freshness).

    :param lock_lease: seconds a claim lives unless renewed (``CACHE_OPTIONS
        ["lock_lease"]``; by default the refresh settings').
    """

    def __init__(self, store: Store, refresh: RefreshSettings, stale_while_revalidate: float,
                 stale_if_error: float, clock: Callable[[], float],
                 monotonic: Callable[[], float], lock_lease: float | None = None) -> None:
        self.store = store
        self.stale_while_revalidate = stale_while_revalidate
        self.stale_if_error = stale_if_error
        self.clock = clock
        self.monotonic = monotonic
        # No in-process tier: a delete in one worker must be seen by the next get of any.
        self.tiers = TwoTier(store, LocalTier(0), 0.0, monotonic, clock)
        self.leases = Leases(store, lock_lease or refresh.lock_lease)
        self.error_ttl = max(refresh.error_ttl, 1.0)
        # A waiter waits while the holder renews its claim, as long as a loader's reader
        # would wait for an origin fetch: bounded, even behind a holder that hangs.
        self.wait_limit = self.leases.lock_lease + refresh.fetch_timeout

    @property
    def lock_lease(self) -> float:
        return self.leases.lock_lease

    # -- get -----------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        """The value for a caller of ``get`` (``None``: recompute it; see the module)."""
        mine = self._mine()
        if mine is not None and key in mine:
            return None  # this caller already holds the claim: it is the one recomputing
        # Only a caller whose app context will end (and give back what it took) claims.
        claims = mine is not None
        try:
            got = self.store.mget(key, self.leases.expiry if claims else None)
        except CacheUnavailable:
            return None
        look = self.tiers.classify(key, got)
        if look.claim is not None:
            return self._take(key, look.claim)
        if look.held:
            return self._wait(key, None, claims)
        if look.passing or look.error is not None:
            self._count("miss")
            return None  # the last recompute stored nothing: recompute, uncoalesced
        if look.found is None:
            if got.value is not MISS:
                self._count("hit")
                return got.value  # a plain value (a counter, a value stored forever)
            if got.cas is not None and claims:
                return self._claim_existing(key, got.cas, None, claims)
            self._count("miss")
            return None
        entry = look.found.entry
        now_state = state(entry.timing, self.clock())
        if now_state is State.FRESH:
            self._count("hit")
            return entry.value
        if now_state is State.STALE:
            claim = self._acquire(key, got.cas) if claims else None
            if claim is not None:
                return self._take(key, claim)
            self._count("stale")
            return entry.value
        fallback = entry if now_state is State.ERROR_ONLY else None
        return self._claim_existing(key, got.cas, fallback, claims)

    def _claim_existing(self, key: str, cas: bytes | None, fallback: Entry | None,
                        claims: bool) -> Any:
        """An item that may not be served as it is: recompute under its lease, or wait
        for whoever holds it (their failure serves ``fallback``: stale-if-error)."""
        if claims:
            claim = self._acquire(key, cas)
            if claim is not None:
                return self._take(key, claim)
        try:
            record = self.leases.lease_record(key)
        except CacheUnavailable:
            record = MISS
        if error_of(record) is not None or is_pass(record) or record is MISS:
            # Its last recompute failed (stale-if-error), or nobody holds it (outside an
            # app context nobody may): answer the old value, or recompute.
            self._count("stale" if fallback else "miss")
            return fallback.value if fallback is not None else None
        return self._wait(key, fallback, claims)

    def _wait(self, key: str, fallback: Entry | None, claims: bool) -> Any:
        """Another caller holds the key: poll until its value lands (answered), its claim
        is replaced by a pass or error record or lapses (recompute; with a claim of our
        own when we may take one), or ``wait_limit`` passes. Bounded."""
        metrics.lease_total.labels("waited").inc()
        deadline = self.monotonic() + self.wait_limit
        delays = poll_delays()
        seen: bytes | None = None
        while True:
            now = self.monotonic()
            if now >= deadline:
                metrics.lease_total.labels("waited_timeout").inc()
                self._count("stale" if fallback else "miss")
                return fallback.value if fallback is not None else None
            gevent.sleep(min(delays(), deadline - now))
            try:
                got = self.store.mget(key, self.leases.expiry if claims else None)
            except CacheUnavailable:
                return fallback.value if fallback is not None else None
            look = self.tiers.classify(key, got)
            if look.claim is not None:
                return self._take(key, look.claim)  # the holder vanished: our turn
            if look.held:
                continue
            found = look.found
            if found is not None and self._servable(found.entry) and (
                    fallback is None or found.entry.stored_at > fallback.stored_at):
                self._count("hit")
                return found.entry.value
            if found is None and (look.passing or look.error is not None
                                  or got.value is MISS):
                self._count("miss")
                return None
            if found is not None and seen is None:
                seen = got.cas
            try:
                record = self.leases.lease_record(key)
            except CacheUnavailable:
                record = MISS
            if error_of(record) is not None or is_pass(record):
                self._count("stale" if fallback else "miss")
                return fallback.value if fallback is not None else None
            if record is MISS:
                # The lease beside the entry is gone without a new value: take it over.
                if claims:
                    claim = self._acquire(key, got.cas)
                    if claim is not None:
                        return self._take(key, claim)
                self._count("stale" if fallback else "miss")
                return fallback.value if fallback is not None else None

    def _acquire(self, key: str, cas: bytes | None) -> Claim | None:
        try:
            return self.leases.acquire(key, cas)
        except CacheUnavailable:
            return None

    def _take(self, key: str, claim: Claim) -> None:
        """This caller recomputes ``key`` under ``claim``: one renewer keeps the claim
        alive until its ``set`` (or the end of its app context), however long it takes."""
        mine = self._mine()
        if mine is None:  # cannot happen: only callers in an app context claim
            self._give_back(claim, None)
            return None
        mine[key] = _Held(claim, gevent.spawn(self._renew, claim))
        self._count("miss")
        return None

    def _renew(self, claim: Claim) -> None:
        while True:
            gevent.sleep(renew_every(self.lock_lease))
            try:
                if not self.leases.renew(claim):
                    return
            except CacheUnavailable:
                pass  # try again at the next interval; the claim may still hold

    # -- set -----------------------------------------------------------------------------

    def envelope(self, value: Any, timeout: float) -> Any:
        """What ``set`` stores: the envelope, or the value itself when it cannot go stale
        (stored forever, already expired) or must stay a counter (an integer)."""
        if timeout <= 0 or type(value) is int:
            return value
        return self._entry(value, timeout).to_wire()

    def _entry(self, value: Any, timeout: float) -> Entry:
        windows = Windows(float(timeout), self.stale_while_revalidate, self.stale_if_error)
        return Entry(value, Timing(self.clock(), windows), "")

    def memcached_ttl(self, timeout: float) -> float:
        """memcached's expiry for a value set with ``timeout``: the end of its last window."""
        if timeout <= 0:
            return timeout
        return timeout + self.stale_while_revalidate + self.stale_if_error

    def set_claimed(self, key: str, value: Any, timeout: float) -> bool | None:
        """Store the recomputed value of a key this caller holds the claim of, fenced on
        the claim's CAS (a delete meanwhile wins: the value is dropped, not added);
        ``None`` when it holds none (the caller does a plain set).

        :raises CodecError: the value cannot be stored.
        """
        held = self._pop(key)
        if held is None:
            return None
        try:
            stored = self.store.mset(key, self.envelope(value, timeout),
                                     self.memcached_ttl(timeout), cas=held.claim.fence)
            if not stored.ok:
                metrics.lease_total.labels("fenced").inc()  # deleted, or a newer value
            if not held.claim.cold:
                self._give_back(held.claim, None)
            return True
        except CacheUnavailable:
            return False
        except CodecError:
            self._give_back(held.claim, PASS_RECORD, PASS_TTL)
            raise

    def forget(self, key: str) -> None:
        """The key was deleted: a claim this caller holds for it goes too (the delete
        removed a cold claim's item already; a refresh lease is given back)."""
        held = self._pop(key)
        if held is not None and not held.claim.cold:
            self._give_back(held.claim, None)

    def release_all(self, failed: bool = True) -> None:
        """Give back every claim this app context still holds (it ended without storing):
        a cold claim becomes a pass record, so its waiters recompute at once instead of
        queueing; a stale entry's lease remembers the failure, so stale-if-error serves
        the old value meanwhile."""
        if not has_app_context():
            return
        held: dict[str, _Held] = g.pop(_HELD, None) or {}
        for h in held.values():
            h.renewer.kill(block=False)
            if not failed:
                self._give_back(h.claim, None)
            elif h.claim.cold:
                self._give_back(h.claim, PASS_RECORD, PASS_TTL)
            else:
                self._give_back(h.claim, error_record(
                    OriginError("the recompute stored nothing")), self.error_ttl)

    # -- helpers -------------------------------------------------------------------------

    def _mine(self) -> dict[str, _Held] | None:
        """The claims of the current app context (a nested ``app_context()`` has its own,
        so its teardown gives back only what it took); ``None`` outside one."""
        if not has_app_context():
            return None
        mine: dict[str, _Held] | None = g.get(_HELD)
        if mine is None:
            mine = {}
            setattr(g, _HELD, mine)
        return mine

    def _pop(self, key: str) -> _Held | None:
        mine = self._mine()
        held = mine.pop(key, None) if mine is not None else None
        if held is not None:
            held.renewer.kill(block=False)
        return held

    def _give_back(self, claim: Claim, record: dict[str, Any] | None, ttl: float = 0.0
                   ) -> None:
        try:
            if record is not None:
                self.leases.replace(claim, record, ttl)
            else:
                self.leases.release(claim)
        except CacheUnavailable:
            pass  # it lapses by itself

    def fresh(self, entry: Entry) -> bool:
        return state(entry.timing, self.clock()) is State.FRESH

    def _servable(self, entry: Entry) -> bool:
        return state(entry.timing, self.clock()) in (State.FRESH, State.STALE)

    @staticmethod
    def entry_of(raw: Any) -> Entry | None:
        if raw is MISS or raw is EMPTY or not Entry.is_wire(raw):
            return None
        try:
            return Entry.from_wire(raw)
        except CodecError:
            return None

    def unwrap(self, raw: Any) -> Any:
        """A stored value as ``get_many``/``has`` see it: a fresh envelope opened, an
        expired one ``None`` (they are not recompute points in Flask-Caching, so they
        keep the plain contract: past its timeout a value is gone)."""
        if raw is MISS or raw is None or raw is EMPTY or is_pass(raw) or error_of(raw):
            return None
        if not Entry.is_wire(raw):
            return raw
        entry = self.entry_of(raw)
        if entry is None or state(entry.timing, self.clock()) is not State.FRESH:
            return None
        return entry.value

    @staticmethod
    def _count(result: str) -> None:
        metrics.requests_total.labels(SOURCE, result).inc()
