"""Herd protection for unchanged Flask-Caching code: the backend's read-through protocol.

Flask-Caching's ``@cache.cached`` and ``@cache.memoize`` do ``get``; on ``None`` they run
the function and ``set`` the result. With this backend that ``get`` is where the fleet
coordinates, using the read path's own pieces (:class:`~service.lease.Leases`, the
waiter's :func:`~service.waiting.next_step` through :meth:`Loader.wait_for_holder`, the
fenced write of :class:`~service.tiers.TwoTier`, negative records, the same metrics):

* a ``get`` that finds nothing takes the key's lease and answers ``None``: this caller
  recomputes, and its ``set`` is written fenced and releases the lease;
* a ``get`` that finds nothing while another caller holds the lease waits for that
  caller's value (bounded by the lease) and answers it: one recompute, not one per
  waiting client. If the lease lapses with nothing stored, the next caller takes it;
* with ``CACHE_STALE_WHILE_REVALIDATE = N``, an expired entry is answered for N more
  seconds to everybody but the one caller that got the lease, who recomputes it;
* with ``CACHE_STALE_IF_ERROR = M``, for M more seconds after that, as long as a
  recompute fails: callers wait for the recomputing one, and get the old value if it
  fails.

A caller that took a lease and never stores (its function raised, or it only looked)
gives the lease back when its app context ends (``teardown_appcontext``), and its
failure is remembered for ``error_ttl`` so the stale-if-error window serves the old value
meanwhile. Outside an app context (a script, a scheduler's job, a bare greenlet) nothing
would give a lease back, and every other worker would wait out ``lock_lease`` for a value
that may never come: there ``get`` still waits for a holder's value, but never takes the
lease itself. A miss answers ``None`` and its caller recomputes, as with plain
Flask-Caching.

Plain ``cache.get``/``cache.set`` keep their contract: ``get`` answers a stored value or
``None``, ``set`` stores; the only visible change is fewer recomputes. Values are stored
in the read path's envelope (``service.entry``) so that they can be served stale;
integers (counters) and values stored forever stay plain.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import has_app_context
from gevent import getcurrent

from . import metrics
from .config import RefreshSettings
from .entry import Entry
from .errors import CacheUnavailable, CodecError, HTTPError, OriginError, OriginTimeout
from .freshness import State, Timing, Windows, state
from .lease import Lease, Leases
from .loader import Loader
from .negative import ErrorMemo
from .store import MISS, Store
from .tiers import LocalTier, TwoTier

log = logging.getLogger(__name__)
SOURCE = "flask-caching"


@dataclass
class _Held:
    lease: Lease
    cas: bytes | None


def _no_fetch(fetch: Callable[[], Any]) -> Any:
    raise RuntimeError("the Flask-Caching backend never fetches: its caller does")


class Coalescer:
    """See the module docstring. One per backend; ``clock`` is wall time (freshness)."""

    def __init__(self, store: Store, refresh: RefreshSettings, stale_while_revalidate: float,
                 stale_if_error: float, clock: Callable[[], float],
                 monotonic: Callable[[], float]) -> None:
        self.store = store
        self.stale_while_revalidate = stale_while_revalidate
        self.stale_if_error = stale_if_error
        self.clock = clock
        self.monotonic = monotonic
        # No in-process tier: a delete in one worker must be seen by the next get of any.
        self.tiers = TwoTier(store, LocalTier(0), 0.0, monotonic)
        self.leases = Leases(store, refresh.lock_lease)
        self.errors = ErrorMemo(store, max(refresh.error_ttl, 1.0), clock)
        self.loader = Loader(self.tiers, self.leases, self.errors, refresh, _no_fetch, clock,
                             monotonic)
        self.wait_limit = refresh.lock_lease + 1.0
        self._held: weakref.WeakKeyDictionary[Any, dict[str, _Held]] = (
            weakref.WeakKeyDictionary())

    # -- get -----------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        """The value for a caller of ``get`` (``None``: recompute it; see the module)."""
        mine = self._mine()
        if key in mine:
            return None  # this caller already took the lease: it is the one recomputing
        try:
            raw = self.store.get(key)
        except CacheUnavailable:
            return None
        entry = self.entry_of(raw)
        if entry is None:
            if raw is not MISS and not Entry.is_wire(raw):
                self._count("hit")
                return raw  # a plain value (a counter, a value stored forever)
            return self._cold(key, None)
        now_state = state(entry.timing, self.clock())
        if now_state is State.FRESH:
            self._count("hit")
            return entry.value
        if now_state is State.STALE:
            claimed = self._claim(key, entry)
            if claimed is True:
                self._count("miss")
                return None
            if isinstance(claimed, Entry):
                # A newer value landed (and its lease came free) since our read.
                self._count("hit")
                return claimed.value
            self._count("stale")
            return entry.value
        if now_state is State.ERROR_ONLY and self.errors.recall(key) is not None:
            self._count("stale")
            return entry.value  # the last recompute failed a moment ago: the old value
        return self._cold(key, entry if now_state is State.ERROR_ONLY else None)

    def _cold(self, key: str, fallback: Entry | None) -> Any:
        """Nothing servable: recompute (with the lease), or wait for whoever has it."""
        deadline = self.monotonic() + self.wait_limit
        while True:
            claimed = self._claim(key, fallback)
            if claimed is True:
                self._count("miss")
                return None
            if isinstance(claimed, Entry):
                self._count("hit")
                return claimed.value  # it landed while we took the lease
            metrics.lease_total.labels("waited").inc()
            try:
                landed = self.loader.wait_for_holder(key, self._servable, deadline)
            except OriginTimeout:
                # The holder took longer than its lease allows: recompute ourselves.
                self._count("stale" if fallback else "miss")
                return fallback.value if fallback is not None else None
            except HTTPError:
                if fallback is not None:
                    self._count("stale")
                    return fallback.value  # its recompute failed: stale-if-error
                continue  # no old value: the next caller (us) recomputes
            if landed is not None:
                self._count("hit")
                return landed.value
            # The lease lapsed with nothing stored: try to take it.

    def _claim(self, key: str, seen: Entry | None) -> bool | Entry:
        """Take the lease: ``True`` (we recompute), ``False`` (somebody else holds it),
        or the entry that landed meanwhile (dogpile's re-read after taking the lease)."""
        if not has_app_context():
            # No teardown would give the lease back if this caller never stores (module
            # docstring): wait for a holder, if there is one, but never become one.
            try:
                return self.leases.holder(key) is None
            except CacheUnavailable:
                return True
        try:
            lease = self.leases.acquire(key)
        except CacheUnavailable:
            return True  # no coordination possible: recompute, as plain Flask-Caching
        if lease is None:
            return False
        try:
            found = self.tiers.read_shared(key)
        except CacheUnavailable:
            found = None
        if found is not None and self._servable(found.entry) and (
                seen is None or found.entry.stored_at > seen.stored_at):
            self._release(lease)
            return found.entry
        self._mine()[key] = _Held(lease, found.cas if found is not None else None)
        return True

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
        """Store the recomputed value of a key this caller holds the lease of, fenced;
        ``None`` when it holds none (the caller does a plain set).

        :raises CodecError: the value cannot be stored.
        """
        held = self._mine().pop(key, None)
        if held is None:
            return None
        try:
            if timeout <= 0 or type(value) is int:
                return bool(self.store.set(key, value, timeout))
            if not self.tiers.write(key, self._entry(value, timeout), held.cas, self.clock()):
                metrics.lease_total.labels("fenced").inc()  # a newer value is stored
            return True
        except CacheUnavailable:
            return False
        finally:
            self._release(held.lease)

    def forget(self, key: str) -> None:
        """The key was deleted: a lease this caller holds for it goes too."""
        held = self._mine().pop(key, None)
        if held is not None:
            self._release(held.lease)

    def release_all(self, failed: bool = True) -> None:
        """Give back every lease this caller still holds (its app context ended without
        storing): remembered as a failed recompute, so stale-if-error applies."""
        held = self._held.pop(getcurrent(), None)
        for key, h in (held or {}).items():
            if failed:
                self.errors.remember(key, OriginError("the recompute stored nothing"))
            self._release(h.lease)

    # -- helpers -------------------------------------------------------------------------

    def _mine(self) -> dict[str, _Held]:
        current = getcurrent()
        mine = self._held.get(current)
        if mine is None:
            mine = self._held[current] = {}
        return mine

    def fresh(self, entry: Entry) -> bool:
        return state(entry.timing, self.clock()) is State.FRESH

    def _servable(self, entry: Entry) -> bool:
        return state(entry.timing, self.clock()) in (State.FRESH, State.STALE)

    @staticmethod
    def entry_of(raw: Any) -> Entry | None:
        if raw is MISS or not Entry.is_wire(raw):
            return None
        try:
            return Entry.from_wire(raw)
        except CodecError:
            return None

    def unwrap(self, raw: Any) -> Any:
        """A stored value as ``get_many``/``has`` see it: a fresh envelope opened, an
        expired one ``None`` (they are not recompute points in Flask-Caching, so they
        keep the plain contract: past its timeout a value is gone)."""
        if raw is MISS:
            return None
        if not Entry.is_wire(raw):
            return raw
        entry = self.entry_of(raw)
        if entry is None or state(entry.timing, self.clock()) is not State.FRESH:
            return None
        return entry.value

    def _release(self, lease: Lease) -> None:
        try:
            self.leases.release(lease)
        except CacheUnavailable:
            pass  # it lapses by itself

    @staticmethod
    def _count(result: str) -> None:
        metrics.requests_total.labels(SOURCE, result).inc()
