"""The one loader: take the lease, re-read, fetch in a greenlet of its own, renew, write
fenced, release. Every path that computes a value goes through :meth:`Loader.load` or
:meth:`Loader.refresh`: a cold miss (the reader waits), a background refresh, the admin's
refresh and periodic jobs. They differ only in ``usable``: which already-stored entry
counts as "the work is done" when the loader re-reads after taking the lease.

* cold miss: any entry that is FRESH or STALE (somebody stored one while we waited);
* background refresh: an entry newer than the stale one the reader saw;
* periodic job: a FRESH entry;
* admin refresh: none (always fetch).

Coalescing happens at two levels. Greenlets of one worker share an in-process flight
(the first loads, the others wait on its result and never touch memcached); workers and
hosts share the lease in memcached, and a reader that does not get it polls for the
holder's value (:mod:`service.waiting` decides each step). The lease is "loose" in
memcached's words (it can be evicted, or lost with its server), so the final write is
fenced with ``gets``/``cas``: a holder whose lease lapsed never overwrites a newer entry.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import gevent
from gevent.event import AsyncResult

from . import codec, metrics
from .config import RefreshSettings
from .entry import Entry
from .errors import CacheUnavailable, CodecError, HTTPError, OriginError, OriginTimeout
from .fetching import Fetcher, Runner
from .lease import Lease, Leases, alive, lease_key
from .logs import event
from .negative import ErrorMemo, error_key, from_record
from .tiers import Found, TwoTier
from .waiting import GiveUp, Raise, Serve, TakeOver, Wait, next_step, poll_delays

log = logging.getLogger(__name__)
MAX_ELSEWHERE = 10_000  # keys remembered as being refreshed by another worker

class _Uncacheable:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCACHEABLE"


UNCACHEABLE = _Uncacheable()
"""Returned by :attr:`Job.storable` for a value that must not be stored."""


def _identity(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Job:
    """What to load for one key, and how.

    :param fetch: computes the value (the origin, the view, the function).
    :param run: runs ``fetch`` when a reader waits for it (by default in a fresh app
        context; a decorated view passes a copy of the caller's own request context).
    :param background: runs ``fetch`` for a background refresh (by default ``run``; a
        view passes one that rebuilds a GET request for the same URL).
    :param storable: turns what ``fetch`` returned into the value to store, or
        :data:`UNCACHEABLE` (a 500 response, one that sets a cookie...).
    :param wrap_errors: an unexpected exception of ``fetch`` becomes a 502
        (:class:`OriginError`); ``False`` lets it propagate as raised (decorators, so
        ``abort()`` and exceptions behave exactly as in plain Flask).
    """

    key: str
    fetch: Callable[[], Any]
    windows: Any
    source: str = "-"
    params: Mapping[str, Any] | None = None
    run: Runner | None = None
    background: Runner | None = None
    storable: Callable[[Any], Any] = _identity
    wrap_errors: bool = True


@dataclass(frozen=True)
class Loaded:
    """What a load produced: the value for the caller, and its entry when it was stored
    (``None``: the value was not cacheable and is answered to this caller only)."""

    value: Any
    entry: Entry | None


Usable = Callable[[Entry], bool]


class Observer(Protocol):
    def finished(self, key: str, outcome: str, now: float, error: str | None = None,
                 job: Job | None = None, entry: Entry | None = None) -> None:
        ...


@dataclass
class _Flight:
    result: AsyncResult = field(default_factory=AsyncResult)


class _Retry(Exception):
    """The leader's load produced nothing a follower may share: load for yourself."""


class Loader:
    """See the module docstring. One per app state.

    :param default_run: how a job without ``run`` runs its fetch (an app context).
    """

    def __init__(self, tiers: TwoTier, leases: Leases, errors: ErrorMemo,
                 settings: RefreshSettings, default_run: Runner,
                 clock: Callable[[], float], monotonic: Callable[[], float],
                 observer: Observer | None = None) -> None:
        self.tiers = tiers
        self.leases = leases
        self.errors = errors
        self.settings = settings
        self.default_run = default_run
        self.clock = clock
        self.monotonic = monotonic
        self.observer = observer
        self.fetcher = Fetcher(leases, settings.fetch_timeout)
        self._flights: dict[str, _Flight] = {}
        self._elsewhere: OrderedDict[str, float] = OrderedDict()

    # -- entry points ------------------------------------------------------------------

    def load(self, job: Job, usable: Usable) -> Loaded:
        """Load ``job.key`` for a reader who waits (a cold miss, or stale-if-error).

        :raises HTTPError: the fetch failed (502/504), now or remembered, or the holder
            of the lease did not deliver in time (504).
        :raises Exception: with ``job.wrap_errors`` off, whatever ``fetch`` raised.
        """
        while True:
            flight = self._flights.get(job.key)
            if flight is None:
                break
            # Greenlets of this worker never race each other for the lease: the first
            # one loads, the others wait on its result without touching memcached.
            try:
                entry: Entry = flight.result.get()
            except _Retry:
                continue  # nothing to share (not cacheable, or not an origin error)
            return Loaded(_private_copy(entry.value), entry)
        flight = self._flights[job.key] = _Flight()
        try:
            loaded = self._load_waiting(job, usable)
        except HTTPError as exc:
            flight.result.set_exception(exc)
            raise
        except BaseException:
            flight.result.set_exception(_Retry())
            raise
        else:
            if loaded.entry is None:
                flight.result.set_exception(_Retry())
            else:
                flight.result.set(loaded.entry)
            return loaded
        finally:
            del self._flights[job.key]

    def refresh(self, job: Job, usable: Usable) -> Loaded | None:
        """Refresh ``job.key`` in the background if this worker gets the lease.

        :return: ``None`` when the work is not ours (another greenlet or worker is on
            it) or already done (``usable`` accepted the stored entry).
        :raises HTTPError: the fetch failed, or its answer may not be cached: a failed
            refresh, so the refresher backs off and stale-if-error applies.
        """
        if job.key in self._flights:
            return None  # a reader of this worker is loading it right now
        flight = self._flights[job.key] = _Flight()
        try:
            held, lease, found = self._take_lease(job.key)
            if held:
                self._note_elsewhere(job.key)
                return None  # another worker is on it
            if found is not None and usable(found.entry):
                # Somebody stored a newer entry after the reader saw the old one (we got
                # the lease they released): the work is done.
                self._release(lease)
                return None
            loaded = self._fetch_and_store(job, lease, found, background=True)
            if loaded.entry is None:
                raise OriginError(f"{job.source}: the refreshed answer may not be cached")
            flight.result.set(loaded.entry)
            return loaded
        except BaseException:
            flight.result.set_exception(_Retry())
            raise
        finally:
            del self._flights[job.key]

    def held_elsewhere(self, key: str) -> bool:
        """Whether a refresh of ``key`` found, a moment ago, another worker holding its
        lease. Until that moment passes, stale reads of this worker need not schedule
        refreshes that would only ask memcached for the lease again (one ``add`` and one
        greenlet per stale read, for nothing)."""
        until = self._elsewhere.get(key)
        if until is None:
            return False
        if self.monotonic() < until:
            return True
        del self._elsewhere[key]
        return False

    def _note_elsewhere(self, key: str) -> None:
        # At most a third of the lease: the holder renews at that pace, so if it died the
        # lease lapses and a later stale read here schedules the refresh again.
        self._elsewhere[key] = self.monotonic() + min(1.0, self.leases.lock_lease / 3)
        self._elsewhere.move_to_end(key)
        while len(self._elsewhere) > MAX_ELSEWHERE:
            self._elsewhere.popitem(last=False)

    # -- the cold path -----------------------------------------------------------------

    def _load_waiting(self, job: Job, usable: Usable) -> Loaded:
        remembered = self.errors.recall(job.key)
        if remembered is not None:
            raise remembered
        deadline = self.monotonic() + self.settings.lock_lease + self.settings.fetch_timeout
        while True:
            held, lease, found = self._take_lease(job.key)
            if not held:
                # dogpile's rule: we entered without a value; run the read again, to see
                # whether the previous holder stored one while we were getting the lease.
                if found is not None and usable(found.entry):
                    self._release(lease)
                    return Loaded(found.entry.value, found.entry)
                return self._fetch_and_store(job, lease, found, background=False)
            metrics.lease_total.labels("waited").inc()
            metrics.lease_waits_total.labels(job.source).inc()
            entry = self.wait_for_holder(job.key, usable, deadline)
            if entry is not None:
                return Loaded(entry.value, entry)
            # TakeOver: the lease lapsed with nothing stored; loop to take it.

    def _take_lease(self, key: str) -> tuple[bool, Lease | None, Found | None]:
        """``(held by another, our lease, the entry re-read after taking it)``.

        Our lease is ``None`` when memcached cannot be asked: no fleet coordination is
        possible, so this worker fetches for itself, unfenced.
        """
        try:
            lease = self.leases.acquire(key)
        except CacheUnavailable:
            return False, None, None
        if lease is None:
            return True, None, None
        try:
            return False, lease, self.tiers.read_shared(key)
        except CacheUnavailable:
            return False, lease, None

    def wait_for_holder(self, key: str, usable: Usable, deadline: float) -> Entry | None:
        """Poll until the holder's entry lands (returned) or the lease lapses (``None``).

        :raises HTTPError: the holder's failure is remembered, or the deadline passed.
        """
        delays = poll_delays()
        step: Any = Wait(delays())
        while True:
            if isinstance(step, Serve):
                entry: Entry = step.entry
                self.tiers.local.put(key, entry, self.tiers.monotonic())
                return entry
            if isinstance(step, Raise):
                raise step.error
            if isinstance(step, TakeOver):
                return None
            if isinstance(step, GiveUp):
                metrics.lease_total.labels("waited_timeout").inc()
                raise OriginTimeout("another worker's fetch did not land in time")
            gevent.sleep(step.delay)
            try:
                found = self.tiers.store.get_many([key, lease_key(key), error_key(key)])
            except CacheUnavailable:
                return None  # memcached went away: fetch for ourselves
            landed = _decode_entry(found.get(key))
            step = next_step(
                landed if landed is not None and usable(landed) else None,
                alive(found.get(lease_key(key)), self.leases.clock()),
                from_record(found.get(error_key(key)), self.clock())
                if self.errors.enabled else None,
                self.monotonic(), deadline, delays())

    # -- fetching and storing ----------------------------------------------------------

    def _fetch_and_store(self, job: Job, lease: Lease | None, found: Found | None,
                         background: bool) -> Loaded:
        """Fetch (renewing the lease meanwhile), store fenced, then release the lease."""
        started = self.monotonic()
        outcome, detail = "ok", None
        entry: Entry | None = None
        try:
            run = (job.background if background else None) or job.run or self.default_run
            raw = self.fetcher.run(job.fetch, run, job.source, job.wrap_errors, lease)
            elapsed = self.monotonic() - started
            metrics.refresh_seconds.labels(job.source).observe(elapsed)
            entry = self._entry_for(job, raw, elapsed)
            if entry is None:
                outcome = "uncacheable"
                metrics.refreshes_total.labels(job.source, outcome).inc()
                return Loaded(raw, None)
            self._store(job, entry, found.cas if found is not None else None)
            metrics.refreshes_total.labels(job.source, "ok").inc()
            event(log, logging.INFO, "refresh", "fetched", source=job.source, key=job.key,
                  outcome="ok", seconds=round(elapsed, 4), leased=lease is not None)
            return Loaded(entry.value, entry)
        except HTTPError as exc:
            outcome = "timeout" if isinstance(exc, OriginTimeout) else "error"
            detail = exc.detail
            metrics.refreshes_total.labels(job.source, outcome).inc()
            event(log, logging.WARNING, "refresh", "fetch failed", source=job.source,
                  key=job.key, outcome=outcome, status=exc.status, detail=exc.detail)
            # Remembered before the lease goes, so a waiter that sees the lease gone
            # also sees why, and does not fetch again what just failed.
            self.errors.remember(job.key, exc)
            raise
        except Exception as exc:
            outcome, detail = "error", f"{type(exc).__name__}: {exc}"
            metrics.refreshes_total.labels(job.source, outcome).inc()
            raise
        finally:
            if self.observer is not None:
                self.observer.finished(job.key, outcome, self.clock(), detail, job, entry)
            if lease is not None:
                # Released only after the write, so waiters see the value before the
                # lease disappears and never start a second fetch in between.
                self._release(lease)

    def _entry_for(self, job: Job, raw: Any, elapsed: float) -> Entry | None:
        value = job.storable(raw)
        if value is UNCACHEABLE:
            return None
        try:
            return Entry.create(value, self.clock(), job.windows, elapsed)
        except CodecError as exc:
            log.warning("%s: not cached, the value cannot be stored: %s", job.source, exc)
            return None

    def _store(self, job: Job, entry: Entry, cas: bytes | None) -> None:
        try:
            if not self.tiers.write(job.key, entry, cas, self.clock()):
                # Somebody stored a newer entry while we fetched (our lease lapsed, or
                # there was none): theirs stays, ours is only answered to our caller.
                metrics.lease_total.labels("fenced").inc()
                event(log, logging.INFO, "fenced", "a newer entry is already stored",
                      source=job.source, key=job.key)
        except CacheUnavailable:
            pass  # the in-process tier has it; memcached gets the next one

    def _release(self, lease: Lease | None) -> None:
        if lease is None:
            return
        try:
            self.leases.release(lease)
        except CacheUnavailable:
            pass  # it lapses by itself after lock_lease


def _decode_entry(raw: Any) -> Entry | None:
    if raw is None:
        return None
    try:
        return Entry.from_wire(raw)
    except CodecError:
        return None


def _private_copy(value: Any) -> Any:
    """A copy for a follower of an in-process flight: requests never share one mutable
    object (a dict a view edits in place)."""
    try:
        return codec.decode(codec.encode(value))
    except CodecError:
        return value
