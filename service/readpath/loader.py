"""The one loader: claim, fetch in a greenlet of its own, renew, write fenced, settle.

Every path that computes a value goes through :meth:`Loader.load` or
:meth:`Loader.refresh`: a cold miss (the reader waits), a background refresh, the admin's
refresh and periodic jobs. The claims are memcached's own (see :mod:`service.lease`): a
cold miss wins the entry's own empty item in the same ``mg`` that found it missing; a
refresh takes a lease item beside the entry it replaces. Either way the final write is
fenced on a CAS, so a fetch that started before an invalidation (a delete) or a newer
write is dropped, never stored: a cold load then fetches again (bounded), a background
refresh simply ends.

Coalescing happens at two levels. Greenlets of one worker share an in-process flight
(the first loads, the others wait on its result, bounded, and never touch memcached);
workers and hosts share the claim, and a reader that did not win polls the key's item
until the holder's value lands, its failure or pass record replaces the claim, or the
claim lapses (then its own ``mg`` wins). Every exit of a load settles its flight:
followers get the value, the failure, ``_Pass`` (the answer may not be stored: run the
view yourself, now) or ``_Retry`` (nothing to share: load again).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import gevent
from gevent.event import AsyncResult

from ..config import RefreshSettings
from ..errors import CacheUnavailable, CodecError, HTTPError, OriginError, OriginTimeout
from ..memcache import codec
from ..observe import metrics
from ..observe.logs import event, key_hash
from .entry import Entry
from .fetching import Fetcher, Runner
from .lease import PASS_RECORD, Claim, Leases, error_of, error_record, is_pass
from .tiers import Found, Look, TwoTier
from .waiting import GiveUp, Wait, next_step, poll_delays

log = logging.getLogger(__name__)
MAX_ELSEWHERE = 10_000  # keys remembered as being refreshed by another worker
PASS_TTL = 5.0
"""Seconds a key whose answer was not storable is not coalesced (hit-for-miss)."""
ATTEMPTS = 3
"""Cold fetches of one load whose write an invalidation undid, before the last one is
answered without being stored."""

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
    (``None``: the value was not cacheable and is answered to this caller only;
    ``passed`` says it was computed without coalescing, Varnish's hit-for-miss)."""

    value: Any
    entry: Entry | None
    passed: bool = False


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


class _Pass(Exception):
    """The leader's answer may not be stored: compute for yourself, at once."""


class _PassNow(Exception):
    """The key's item says pass (hit-for-miss): settle the flight first, then compute."""

    def __init__(self, cas: bytes | None) -> None:
        super().__init__("pass")
        self.cas = cas


class _Superseded(Exception):
    """The fenced write found the claim's item gone or changed: the fetch began before an
    invalidation or a newer write, so its value is neither stored nor answered."""

    def __init__(self, loaded: Loaded) -> None:
        super().__init__("superseded")
        self.loaded = loaded


class Loader:
    """See the module docstring. One per app state.

    :param default_run: how a job without ``run`` runs its fetch (an app context).
    """

    def __init__(self, tiers: TwoTier, leases: Leases, settings: RefreshSettings,
                 default_run: Runner, clock: Callable[[], float],
                 monotonic: Callable[[], float], observer: Observer | None = None) -> None:
        self.tiers = tiers
        self.leases = leases
        self.settings = settings
        self.default_run = default_run
        self.clock = clock
        self.monotonic = monotonic
        self.observer = observer
        self.fetcher = Fetcher(leases, settings.fetch_timeout)
        self.pass_ttl = PASS_TTL
        self._flights: dict[str, _Flight] = {}
        self._elsewhere: OrderedDict[str, float] = OrderedDict()

    @property
    def lock_lease(self) -> float:
        return self.leases.lock_lease

    @property
    def claim_ttl(self) -> float:
        """The TTL of a cold claim's item (see :func:`service.lease.item_lifetime`)."""
        return self.leases.expiry

    # -- entry points ------------------------------------------------------------------

    def load(self, job: Job, usable: Usable, look: Look | None = None) -> Loaded:
        """Load ``job.key`` for a reader who waits (a cold miss, or stale-if-error).

        :param look: what the reader's own read found (it may hold the cold claim).
        :raises HTTPError: the fetch failed (502/504), now or remembered, or the holder
            of the claim did not deliver in time (504).
        :raises Exception: with ``job.wrap_errors`` off, whatever ``fetch`` raised.
        """
        deadline = self.monotonic() + self.lock_lease + self.settings.fetch_timeout
        if look is not None and look.passing:
            # Hit-for-miss: the key's last answer was not storable. No flight either: the
            # readers of this worker run concurrently, as in plain Flask.
            return self._pass(job, look.cas)
        if look is not None and look.error is not None:
            raise look.error
        while look is None or look.claim is None:
            flight = self._flights.get(job.key)
            if flight is None:
                break
            # Greenlets of this worker never race each other for the claim: the first
            # one loads, the others wait on its result without touching memcached. A
            # reader that won a new claim does not join: the item the flight claimed is
            # gone (invalidated), and its value must not be answered now.
            try:
                entry: Entry = flight.result.get(
                    timeout=max(0.0, deadline - self.monotonic()))
            except _Retry:
                look = None
                continue
            except _Pass:
                return self._pass(job, None)
            except gevent.Timeout:
                raise OriginTimeout("this worker's own fetch did not land in time") from None
            return Loaded(_private_copy(entry.value), entry)
        flight = self._flights[job.key] = _Flight()
        try:
            loaded = self._load_waiting(job, usable, look, deadline)
        except _PassNow as now:
            # Release this worker's followers before computing: they run concurrently.
            flight.result.set_exception(_Pass())
            if self._flights.get(job.key) is flight:
                del self._flights[job.key]
            return self._pass(job, now.cas)
        except HTTPError as exc:
            flight.result.set_exception(exc)
            raise
        except Exception:
            # The view raised (abort(404), an error): nothing anyone may share, and
            # nobody queues behind it; each follower runs the view itself.
            flight.result.set_exception(_Pass())
            raise
        except BaseException:
            flight.result.set_exception(_Retry())
            raise
        else:
            if loaded.entry is not None:
                flight.result.set(loaded.entry)
            else:
                flight.result.set_exception(_Pass() if loaded.passed else _Retry())
            return loaded
        finally:
            if self._flights.get(job.key) is flight:
                del self._flights[job.key]

    def refresh(self, job: Job, usable: Usable, seen: Found | None = None,
                claim: Claim | None = None) -> Loaded | None:
        """Refresh ``job.key`` in the background if this worker gets the claim.

        :param seen: the stale entry the reader saw (its CAS fences the write); ``None``
            reads the key first (the admin's button, periodic jobs), and then ``usable``
            decides whether a stored entry means the work is done.
        :param claim: a claim the reader already won (a lost entry answered from the
            local tier).
        :return: ``None`` when the work is not ours (another greenlet or worker is on
            it), already done, or undone by an invalidation meanwhile.
        :raises HTTPError: the fetch failed, or its answer may not be cached: a failed
            refresh, so the refresher backs off and stale-if-error applies.
        """
        if job.key in self._flights:
            if claim is not None:
                self.give_back(claim)
            return None  # a reader of this worker is loading it right now
        flight = self._flights[job.key] = _Flight()
        try:
            if claim is None:
                try:
                    claim = self._refresh_claim(job.key, usable, seen)
                except CacheUnavailable:
                    claim = None  # no fleet coordination possible: refresh for ourselves
                else:
                    if claim is None:
                        flight.result.set_exception(_Retry())
                        return None
            try:
                loaded = self._fetch_and_store(job, claim, background=True)
            except _Superseded:
                flight.result.set_exception(_Retry())
                return None
            if loaded.entry is None:
                raise OriginError(f"{job.source}: the refreshed answer may not be cached")
            flight.result.set(loaded.entry)
            return loaded
        except BaseException:
            if not flight.result.ready():
                flight.result.set_exception(_Retry())
            raise
        finally:
            if self._flights.get(job.key) is flight:
                del self._flights[job.key]

    def forget(self, key: str) -> None:
        """``key`` was invalidated: readers arriving from now on do not join a flight
        that began before (its value predates the invalidation; its fenced write will
        find the item gone)."""
        self._flights.pop(key, None)

    def _refresh_claim(self, key: str, usable: Usable, seen: Found | None) -> Claim | None:
        """The claim a background refresh works under, or ``None`` (not ours to do).

        :raises CacheUnavailable: memcached could not be asked.
        """
        if seen is not None and seen.cas is not None:
            claim = self._background_lease(key, seen.cas)
            if claim is not None:
                claim.epoch = seen.entry.epoch
            return claim
        look = self.tiers.look_shared(key, self.claim_ttl)
        if look.claim is not None:
            look.claim.epoch = self._epoch(key)
            return look.claim
        found = look.found
        if found is not None and usable(found.entry):
            return None  # somebody stored what we were asked for
        if found is None and not look.unusable and not look.passing and look.error is None:
            return None  # held by another worker's cold claim
        claim = self._background_lease(key, look.cas)
        if claim is not None:
            claim.epoch = found.entry.epoch if found is not None else self._epoch(key)
        return claim

    def held_elsewhere(self, key: str) -> bool:
        """Whether a refresh of ``key`` found, a moment ago, another worker holding its
        claim. Until that moment passes, stale reads of this worker need not schedule
        refreshes that would only ask memcached again (one write and one greenlet per
        stale read, for nothing)."""
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
        self._elsewhere[key] = self.monotonic() + min(1.0, self.lock_lease / 3)
        self._elsewhere.move_to_end(key)
        while len(self._elsewhere) > MAX_ELSEWHERE:
            self._elsewhere.popitem(last=False)

    def give_back(self, claim: Claim | None, record: dict[str, Any] | None = None,
                  ttl: float = 0.0) -> None:
        """Release ``claim`` (ours only), or replace it with ``record`` for ``ttl``."""
        if claim is None:
            return
        try:
            if record is not None and ttl > 0:
                self.leases.replace(claim, record, ttl)
            else:
                self.leases.release(claim)
        except CacheUnavailable:
            pass  # it lapses by itself after lock_lease

    # -- the cold path -----------------------------------------------------------------

    def _load_waiting(self, job: Job, usable: Usable, look: Look | None,
                      deadline: float) -> Loaded:
        delays = poll_delays()
        attempts = 0
        waited = False
        while True:
            if look is None:
                try:
                    look = self.tiers.look_shared(job.key, self.claim_ttl)
                except CacheUnavailable:
                    # No fleet coordination is possible: fetch for ourselves, unfenced,
                    # and keep the value in this worker only.
                    return self._fetch_and_store(job, None, background=False)
            if look.down:
                return self._fetch_and_store(job, None, background=False)
            found = look.found
            if found is not None and usable(found.entry):
                # dogpile's rule: we entered without a value; another holder stored one
                # while we were getting here.
                return Loaded(found.entry.value, found.entry)
            if look.error is not None:
                raise look.error
            if look.passing:
                raise _PassNow(look.cas)
            claim = look.claim
            if claim is not None:
                claim.epoch = self._epoch(job.key)
            elif found is not None or look.unusable:
                # An item that is no servable entry (usable only on error, or garbage):
                # it stays while one worker replaces it under the lease beside it.
                claim = self._acquire(job.key, look.cas)
                if claim is not None:
                    claim.epoch = found.entry.epoch if found is not None else ""
            if claim is not None:
                try:
                    return self._fetch_and_store(job, claim, background=False)
                except _Superseded as exc:
                    attempts += 1
                    if attempts >= ATTEMPTS:
                        return Loaded(exc.loaded.value, None)
                    look = None
                    continue
            # Somebody else holds the claim: look again in a moment.
            if not waited:
                waited = True
                metrics.lease_total.labels("waited").inc()
                metrics.lease_waits_total.labels(job.source).inc()
            # What landed, failed or lapsed was handled above from the look itself; here
            # the claim is still held, and the pure policy says wait or give up.
            step = next_step(None, True, None, self.monotonic(), deadline, delays())
            if isinstance(step, GiveUp):
                metrics.lease_total.labels("waited_timeout").inc()
                raise OriginTimeout("another worker's fetch did not land in time")
            assert isinstance(step, Wait)
            gevent.sleep(step.delay)
            look = None

    def _acquire(self, key: str, fence: bytes | None) -> Claim | None:
        """The refresh lease of an existing item, or ``None`` while another worker holds
        it; a failure or pass record in its place is raised (the waiter answers it)."""
        try:
            claim = self.leases.acquire(key, fence)
            if claim is not None:
                return claim
            claim, record = self.leases.take_over(key, fence, records=False)
            if claim is not None:
                return claim
        except CacheUnavailable:
            return None
        self._note_elsewhere(key)
        error = error_of(record)
        if error is not None:
            raise error
        if is_pass(record):
            raise _PassNow(None)
        return None

    def _background_lease(self, key: str, fence: bytes | None) -> Claim | None:
        """A background refresh's lease: free, or held by a failure (or pass) record, which
        the refresher's own back-off has already waited out. A live holder keeps it.

        :raises CacheUnavailable: memcached could not be asked.
        """
        claim = self.leases.acquire(key, fence) or self.leases.take_over(key, fence)[0]
        if claim is None:
            self._note_elsewhere(key)
        return claim

    def _epoch(self, key: str) -> str:
        try:
            return self.tiers.epoch(key)
        except CacheUnavailable:
            return ""

    def _pass(self, job: Job, cas: bytes | None) -> Loaded:
        """Compute ``job`` for this caller alone (the key's last answer was not storable).

        A storable answer replaces the pass record (fenced on its CAS), so the key is
        cached again from the first request that may be.
        """
        metrics.lease_total.labels("passed").inc()
        run = job.run or self.default_run
        raw = self.fetcher.run(job.fetch, run, job.source, job.wrap_errors, None)
        entry = self._entry_for(job, raw, 0.0, "")
        if entry is None:
            return Loaded(raw, None, passed=True)
        if cas is not None:
            entry = Entry(entry.value, entry.timing, entry.etag, self._epoch(job.key))
            try:
                self.tiers.write(job.key, entry, Claim(job.key, cas))
            except CacheUnavailable:
                pass
        return Loaded(entry.value, entry)

    # -- fetching and storing ----------------------------------------------------------

    def _fetch_and_store(self, job: Job, claim: Claim | None, background: bool) -> Loaded:
        """Fetch (renewing the claim meanwhile), store fenced, settle the claim.

        :raises _Superseded: the write found the claim's item gone or changed.
        """
        started = self.monotonic()
        outcome, detail = "ok", None
        entry: Entry | None = None
        settled = False
        try:
            run = (job.background if background else None) or job.run or self.default_run
            raw = self.fetcher.run(job.fetch, run, job.source, job.wrap_errors, claim)
            elapsed = self.monotonic() - started
            metrics.refresh_seconds.labels(job.source).observe(elapsed)
            entry = self._entry_for(job, raw, elapsed, claim.epoch if claim else "")
            if entry is None:
                outcome = "uncacheable"
                metrics.refreshes_total.labels(job.source, outcome).inc()
                # Hit-for-miss: the waiters compute for themselves at once, and so do
                # the next readers for a few seconds; none of them queues behind another.
                self.give_back(claim, PASS_RECORD, self.pass_ttl)
                settled = True
                return Loaded(raw, None, passed=True)
            code = self._store(job, entry, claim)
            if claim is not None and not claim.cold:
                self.give_back(claim)  # the lease beside the entry
            settled = True
            if code in ("EX", "NF") and claim is not None:
                outcome = "superseded"
                metrics.refreshes_total.labels(job.source, outcome).inc()
                if code == "EX" and not background:
                    newer = self._newer(job.key)
                    if newer is not None:
                        return Loaded(newer.value, newer)
                raise _Superseded(Loaded(raw, None))
            metrics.refreshes_total.labels(job.source, "ok").inc()
            event(log, logging.INFO, "refresh", f"{job.source}: fetched in {elapsed:.3f}s "
                  f"and stored (key {key_hash(job.key)})",
                  source=job.source, key=job.key, outcome="ok", seconds=round(elapsed, 4),
                  leased=claim is not None)
            return Loaded(entry.value, entry)
        except HTTPError as exc:
            outcome = ("timeout" if isinstance(exc, OriginTimeout)
                       else "client_error" if exc.status < 500 else "error")
            detail = exc.detail
            metrics.refreshes_total.labels(job.source, outcome).inc()
            # A 4xx is the caller's answer (a bad parameter, a missing item), not a failure
            # of the origin: said at INFO, and never counted among the fetch errors.
            said = "answered" if outcome == "client_error" else "failed with"
            event(log, logging.INFO if outcome == "client_error" else logging.WARNING,
                  "refresh", f"{job.source}: fetch {said} {exc.status} "
                  f"(key {key_hash(job.key)}): {exc.detail or exc.error}",
                  source=job.source, key=job.key, outcome=outcome, status=exc.status,
                  detail=exc.detail)
            if not settled:
                # The failure replaces the claim in one write, so a waiter that sees the
                # claim gone also sees why, and does not fetch again what just failed.
                self.give_back(claim, error_record(exc) if exc.status in (502, 504)
                               else None, self.settings.error_ttl)
                settled = True
            raise
        except Exception as exc:
            if isinstance(exc, _Superseded):
                raise
            status = client_status(exc)
            outcome = "client_error" if status is not None else "error"
            detail = f"{type(exc).__name__}: {exc}"
            metrics.refreshes_total.labels(job.source, outcome).inc()
            if not settled:
                self.give_back(claim, PASS_RECORD, self.pass_ttl)
                settled = True
            raise
        finally:
            if not settled:
                self.give_back(claim)  # killed mid-fetch: give the claim back at once
            if self.observer is not None:
                self.observer.finished(job.key, outcome, self.clock(), detail, job, entry)

    def _newer(self, key: str) -> Entry | None:
        try:
            found = self.tiers.read_shared(key)
        except CacheUnavailable:
            return None
        return found.entry if found is not None else None

    def _entry_for(self, job: Job, raw: Any, elapsed: float, epoch: str) -> Entry | None:
        value = job.storable(raw)
        if value is UNCACHEABLE:
            return None
        try:
            entry = Entry.create(value, self.clock(), job.windows, elapsed)
        except CodecError as exc:
            event(log, logging.WARNING, "not_cached",
                  f"{job.source}: not cached (key {key_hash(job.key)}): the value cannot be "
                  f"stored: {exc}", source=job.source, key=job.key)
            return None
        return Entry(entry.value, entry.timing, entry.etag, epoch)

    def _store(self, job: Job, entry: Entry, claim: Claim | None) -> str:
        try:
            code = self.tiers.write(job.key, entry, claim)
        except CacheUnavailable:
            return "HD"  # the in-process tier has it; memcached gets the next one
        if code != "HD" and claim is not None:
            # The item changed or vanished since the claim: an invalidation, or a newer
            # entry. Ours is not stored, and not answered either.
            metrics.lease_total.labels("fenced").inc()
            event(log, logging.INFO, "fenced", "the claimed item changed; not stored",
                  source=job.source, key=job.key, code=code)
        return code


def client_status(exc: BaseException) -> int | None:
    """The 4xx status of an exception a view raised to answer its caller (Flask's
    ``abort(404)`` raises one with a ``code``), else ``None``: such an answer is the
    caller's, not a failed fetch."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) and 400 <= code < 500 else None


def _private_copy(value: Any) -> Any:
    """A copy for a follower of an in-process flight: requests never share one mutable
    object (a dict a view edits in place)."""
    try:
        return codec.decode(codec.encode(value))
    except CodecError:
        return value
