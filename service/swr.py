"""Stale-while-revalidate reads: the piece that composes policy, tiers, leases and refresher.

Like dogpile.cache's ``CacheRegion``: :mod:`service.freshness` decides, :mod:`service.tiers`
and :mod:`service.lease` do the I/O, :mod:`service.refresher` runs the background work.

``get_or_fetch(key, fetch, windows)``:

* FRESH: answer from the nearest tier (``HIT``); XFetch may schedule an early refresh.
* STALE: answer at once (``STALE``) and schedule one background refresh. Nobody waits.
* usable only on error: fetch now; if the fetch fails, serve the old copy (``STALE``).
* nothing usable: fetch and wait (``MISS``). Concurrent misses coalesce: greenlets of this
  worker share one in-process flight; workers and hosts share one lease in memcached, and
  the others wait for the holder's value, fetching themselves only once the lease lapses.
  A failed cold fetch is remembered for ``error_ttl`` so a failing origin is not hammered.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import gevent
from flask import Flask
from gevent.event import AsyncResult

from . import metrics
from .clients import release_connection
from .config import RefreshSettings
from .entry import Entry
from .errors import CacheUnavailable, CodecError, HTTPError, OriginError, OriginTimeout
from .freshness import Action, State, Windows, decide, state
from .lease import Lease, Leases, lease_key, may_take_over, poll_delays, renew_every
from .logs import event
from .refresher import Refresher
from .store import MISS
from .tiers import Found, TwoTier

log = logging.getLogger(__name__)
EXTENSION = "service.swr"

Fetch = Callable[[], Any]
ContextFactory = Callable[[], AbstractContextManager[Any]]


@dataclass
class Known:
    """What the admin page shows about a key this worker has served."""

    source: str
    params: dict[str, str] | None = None
    last_outcome: str | None = None
    last_refresh_at: float | None = None


@dataclass(frozen=True)
class Result:
    """What a read answered: the value, its entry, and ``HIT`` / ``STALE`` / ``MISS``."""

    value: Any
    entry: Entry
    status: str


def error_key(key: str) -> str:
    return f"err\x00{key}"


class SWRCache:
    """One per app: see the module docstring. Built by :meth:`service.extension.SWR.init_app`."""

    def __init__(self, app: Flask, tiers: TwoTier, leases: Leases, refresher: Refresher,
                 settings: RefreshSettings, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.tiers = tiers
        self.leases = leases
        self.refresher = refresher
        self.settings = settings
        self.clock = clock
        self.monotonic = monotonic
        self._flights: dict[str, AsyncResult] = {}
        self.known: OrderedDict[str, Known] = OrderedDict()
        self.known_max = max(1000, tiers.local.max_entries)

    # -- reads -------------------------------------------------------------------------

    def get_or_fetch(self, key: str, fetch: Fetch, windows: Windows, source: str = "-",
                     context: ContextFactory | None = None,
                     params: dict[str, str] | None = None) -> Result:
        """Read ``key`` with stale-while-revalidate semantics.

        :param fetch: computes the value; called in a greenlet of its own, inside
            ``context()`` (a fresh app context by default), bounded by ``fetch_timeout``.
        :param windows: ``max_age``, ``stale_while_revalidate``, ``stale_if_error``.
        :param source: the label used in metrics and logs.
        :param params: the request parameters behind ``key``, for the admin page.
        :raises OriginError: the fetch failed and no stale copy may be served (502).
        :raises OriginTimeout: the fetch took too long, and no stale copy may be served.
        """
        context = context or self.app.app_context
        self._note(key, source, params)
        found = self.tiers.read(key)
        now = self.clock()
        decision = decide(found.entry.timing if found else None, now, self.settings.xfetch_beta)
        if found is not None and decision.serves_now:
            if decision.action is Action.SERVE_AND_REFRESH:
                self.schedule_refresh(key, fetch, windows, source, context,
                                      seen=found.entry.stored_at)
            result = "hit" if decision.state is State.FRESH else "stale"
            metrics.requests_total.labels(source, result).inc()
            return Result(found.entry.value, found.entry, result.upper())
        fallback = None
        if found is not None and decision.action is Action.FETCH_OR_SERVE_ON_ERROR:
            fallback = found.entry
        try:
            entry = self._single_flight(key, fetch, windows, source, context)
        except HTTPError:
            if fallback is None:
                metrics.requests_total.labels(source, "miss").inc()
                raise
            metrics.requests_total.labels(source, "stale").inc()
            return Result(fallback.value, fallback, "STALE")
        metrics.requests_total.labels(source, "miss").inc()
        return Result(entry.value, entry, "MISS")

    def _note(self, key: str, source: str, params: dict[str, str] | None) -> None:
        known = self.known.get(key)
        if known is None:
            known = self.known[key] = Known(source, params)
            while len(self.known) > self.known_max:
                self.known.popitem(last=False)
        elif params is not None:
            known.params = params
        self.known.move_to_end(key)

    def _outcome(self, key: str, outcome: str) -> None:
        known = self.known.get(key)
        if known is not None:
            known.last_outcome, known.last_refresh_at = outcome, self.clock()

    def _single_flight(self, key: str, fetch: Fetch, windows: Windows, source: str,
                       context: ContextFactory) -> Entry:
        # Greenlets of this worker never race each other for the lease: the first one
        # loads, the others wait on its result.
        flight = self._flights.get(key)
        if flight is not None:
            release_connection()
            entry: Entry = flight.get()
            return entry
        flight = self._flights[key] = AsyncResult()
        try:
            entry = self._load(key, fetch, windows, source, context)
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        else:
            flight.set(entry)
            return entry
        finally:
            del self._flights[key]

    def _load(self, key: str, fetch: Fetch, windows: Windows, source: str,
              context: ContextFactory) -> Entry:
        """Cold path: take the lease and fetch, or wait for whoever holds it."""
        self._raise_remembered_error(key)
        deadline = self.monotonic() + self.settings.lock_lease + self.settings.fetch_timeout
        next_delay = poll_delays()
        while True:
            try:
                lease = self.leases.acquire(key)
            except CacheUnavailable:
                # memcached is unreachable: no fleet coordination is possible. Fetch for
                # this worker (the in-process flight still coalesces its greenlets).
                return self._fetch_and_store(key, fetch, windows, source, context, None, None)
            if lease is not None:
                # dogpile's rule: we entered without a value; run the read again, to see
                # whether the previous holder stored one while we were getting the lease.
                found = self._read_shared(key)
                if found is not None and state(found.entry.timing, self.clock()) in (
                        State.FRESH, State.STALE):
                    self._release(lease)
                    return found.entry
                cas = found.cas if found is not None else None
                return self._fetch_and_store(key, fetch, windows, source, context, lease, cas)
            metrics.lease_total.labels("waited").inc()
            entry = self._wait_for_holder(key, deadline, next_delay)
            if entry is not None:
                return entry
            if self.monotonic() >= deadline:
                metrics.lease_total.labels("waited_timeout").inc()
                raise OriginTimeout(f"another worker's fetch of {source} did not land in time")

    def _wait_for_holder(self, key: str, deadline: float,
                         next_delay: Callable[[], float]) -> Entry | None:
        """Poll memcached until the holder's value lands (returned), or the lease lapses
        or the deadline passes (``None``: the caller tries to take the lease)."""
        keys = [key, lease_key(key), error_key(key)]
        while self.monotonic() < deadline:
            release_connection()
            gevent.sleep(min(next_delay(), max(0.0, deadline - self.monotonic())))
            try:
                found = self.tiers.store.get_many(keys)
            except CacheUnavailable:
                return None
            if key in found:
                try:
                    entry = Entry.from_wire(found[key])
                except CodecError:
                    entry = None
                if entry is not None and state(entry.timing, self.clock()) in (
                        State.FRESH, State.STALE):
                    self.tiers.local.put(key, entry, self.monotonic())
                    return entry
            if error_key(key) in found:
                self._raise_remembered_error(key, found[error_key(key)])
            if may_take_over(lease_key(key) in found, entry_landed=False):
                return None
        return None

    # -- fetching ----------------------------------------------------------------------

    def _fetch_and_store(self, key: str, fetch: Fetch, windows: Windows, source: str,
                         context: ContextFactory, lease: Lease | None,
                         cas: bytes | None) -> Entry:
        """Fetch (renewing the lease meanwhile), store fenced, then release the lease."""
        renewer = gevent.spawn(self._renew_while_fetching, lease) if lease else None
        started = self.monotonic()
        try:
            try:
                value = self._run_fetch(fetch, context, source)
            finally:
                if renewer is not None:
                    renewer.kill(block=True)
            elapsed = self.monotonic() - started
            metrics.refresh_seconds.labels(source).observe(elapsed)
            try:
                entry = Entry.create(value, self.clock(), windows, elapsed)
            except CodecError as exc:
                metrics.refreshes_total.labels(source, "error").inc()
                raise OriginError(f"{source}: the origin's value cannot be cached: {exc}") from exc
            self._store(key, entry, cas, source)
            metrics.refreshes_total.labels(source, "ok").inc()
            event(log, logging.INFO, "refresh", "fetched", source=source, key=key,
                  outcome="ok", seconds=round(elapsed, 4), leased=lease is not None)
            self._outcome(key, "ok")
            return entry
        except HTTPError as exc:
            outcome = "timeout" if isinstance(exc, OriginTimeout) else "error"
            event(log, logging.WARNING, "refresh", "fetch failed", source=source, key=key,
                  outcome=outcome, status=exc.status, detail=exc.detail)
            self._outcome(key, outcome)
            self._remember_error(key, exc)
            raise
        finally:
            if lease is not None:
                # Released only after the write, so waiters see the value before the
                # lease disappears and never start a second fetch in between.
                self._release(lease)

    def _run_fetch(self, fetch: Fetch, context: ContextFactory, source: str) -> Any:
        """Run ``fetch`` in its own greenlet and context, bounded by ``fetch_timeout``.

        A greenlet of its own, not ``gevent.Timeout`` around the call: the timeout is
        enforced from outside, and the fetch's own app context (and so its own pooled
        memcached connection) is torn down properly when it is killed.
        """
        timeout = self.settings.fetch_timeout

        def run() -> tuple[bool, Any]:
            # Failures are returned, not raised, so gevent does not print every origin
            # error as a crashed greenlet; they are logged and counted below instead.
            try:
                with context():
                    return True, fetch()
            except Exception as exc:  # noqa: BLE001 - handed to the caller as a value
                return False, exc

        job = gevent.spawn(run)
        release_connection()  # the fetch has its own; do not hold ours while it runs
        job.join(timeout=timeout)
        if not job.ready():
            job.kill(block=False)
            metrics.refreshes_total.labels(source, "timeout").inc()
            raise OriginTimeout(f"{source}: the origin did not answer within {timeout:g}s")
        if not job.successful():  # killed from outside (GreenletExit)
            raise OriginError(f"{source}: the fetch was interrupted")
        ok, value = job.value
        if ok:
            return value
        if isinstance(value, HTTPError):
            outcome = "timeout" if isinstance(value, OriginTimeout) else "error"
            metrics.refreshes_total.labels(source, outcome).inc()
            raise value
        metrics.refreshes_total.labels(source, "error").inc()
        raise OriginError(f"{source}: {type(value).__name__}: {value}") from value

    def _renew_while_fetching(self, lease: Lease) -> None:
        with self.app.app_context():  # its own connection: never share the fetcher's
            while True:
                gevent.sleep(renew_every(self.leases.lock_lease))
                try:
                    if not self.leases.renew(lease):
                        return  # lost: the fenced write protects any newer value
                except CacheUnavailable:
                    pass  # try again at the next interval; the lease may still hold

    def _store(self, key: str, entry: Entry, cas: bytes | None, source: str) -> None:
        try:
            if not self.tiers.write(key, entry, cas, self.clock()):
                # Somebody stored a newer entry while we fetched (our lease lapsed, or
                # there was none): theirs stays, ours is only answered to our caller.
                metrics.lease_total.labels("fenced").inc()
                event(log, logging.INFO, "fenced", "a newer entry is already stored",
                      source=source, key=key)
        except CacheUnavailable:
            pass  # the in-process tier has it; memcached will get the next one

    def _release(self, lease: Lease) -> None:
        try:
            self.leases.release(lease)
        except CacheUnavailable:
            pass  # it lapses by itself after lock_lease

    def _read_shared(self, key: str) -> Found | None:
        try:
            return self.tiers.read_shared(key)
        except CacheUnavailable:
            return None

    # -- negative caching --------------------------------------------------------------

    def _remember_error(self, key: str, exc: HTTPError) -> None:
        if self.settings.error_ttl <= 0:
            return
        record = {"status": exc.status, "detail": exc.detail}
        try:
            self.tiers.store.set(error_key(key), record, self.settings.error_ttl)
        except CacheUnavailable:
            pass

    def _raise_remembered_error(self, key: str, record: Any = MISS) -> None:
        if self.settings.error_ttl <= 0:
            return
        if record is MISS:
            try:
                record = self.tiers.store.get(error_key(key))
            except CacheUnavailable:
                return
        if isinstance(record, dict) and record.get("status") in (502, 504):
            cls = OriginTimeout if record["status"] == 504 else OriginError
            raise cls(f"{record.get('detail', '')} (remembered for a few seconds)")

    # -- background refresh ------------------------------------------------------------

    def schedule_refresh(self, key: str, fetch: Fetch, windows: Windows, source: str = "-",
                         context: ContextFactory | None = None, seen: float | None = None,
                         force: bool = False) -> bool:
        """Refresh ``key`` in the background (one worker of the fleet does it)."""
        context = context or self.app.app_context
        return self.refresher.schedule(
            key, lambda: self.refresh(key, fetch, windows, source, context, force, seen),
            source)

    def refresh(self, key: str, fetch: Fetch, windows: Windows, source: str = "-",
                context: ContextFactory | None = None, force: bool = False,
                seen: float | None = None) -> bool:
        """Refresh now if this worker gets the lease; ``False`` when another holds it, or
        when somebody stored a newer entry than the one that made us refresh.

        :param seen: ``stored_at`` of the entry the reader saw (stale, or due for an
            early refresh); a newer one in memcached means the work is already done.
        :param force: refresh even if the entry is fresh (the admin's button).
        :raises HTTPError: the fetch failed (the old entry stays, within stale_if_error).
        """
        context = context or self.app.app_context
        try:
            lease = self.leases.acquire(key)
        except CacheUnavailable:
            lease = None  # no coordination possible: refresh this worker's copy
        else:
            if lease is None:
                return False  # another worker is on it
        found = self._read_shared(key)
        if not force and found is not None and (
                found.entry.stored_at > seen if seen is not None
                else state(found.entry.timing, self.clock()) is State.FRESH):
            # Somebody refreshed it after we saw it (we got the lease they released).
            if lease is not None:
                self._release(lease)
            return False
        self._fetch_and_store(key, fetch, windows, source, context, lease,
                              found.cas if found is not None else None)
        return True

    def invalidate(self, key: str) -> None:
        """Forget ``key`` in this worker and in memcached (other workers: within l1_ttl)."""
        self.tiers.delete(key)

    # -- periodic functions --------------------------------------------------------------

    def periodic(self, name: str, every: float, fn: Fetch,
                 windows: Windows | None = None) -> None:
        """Recompute ``fn`` every ``every`` seconds, by whichever worker holds the lease.

        Readers call :meth:`get_or_fetch` (or ``swr.value(name)``) and never wait for it,
        except the very first read of a cold cache.
        """
        windows = windows or Windows(every, every * 2, 86400.0)

        def run() -> float:
            found = self._read_shared(name)
            now = self.clock()
            if found is not None and state(found.entry.timing, now) is State.FRESH:
                return max(0.05, found.entry.timing.fresh_until - now)
            try:
                self.refresh(name, fn, windows, source=name)
            except HTTPError as exc:
                log.warning("periodic %s failed: %s", name, exc)
            return every

        self.refresher.register(name, every, run)
