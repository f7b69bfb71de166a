"""The read path, in dogpile.cache's shape: key -> tiers -> decision -> serve or load.

:meth:`Region.get_or_load` reads the nearest tier (:mod:`service.tiers`), asks the pure
policy what to do (:func:`service.freshness.decide`), and then:

* FRESH: answers (``HIT``); XFetch may schedule an early background refresh;
* STALE: answers at once (``STALE``) and schedules one background refresh: nobody waits;
* usable only on error: loads now; if that fails, answers the old copy (``STALE``);
* nothing usable: loads and waits (``MISS``), coalesced by :class:`~service.loader.Loader`.

The region knows nothing of leases, flights or connections: the loader owns those. It
only chooses *which* entries count as done for each kind of load (the ``usable``
predicates below) and hands background work to the :class:`~service.refresher.Refresher`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import CacheUnavailable, HTTPError
from ..observe import metrics
from .entry import Entry
from .freshness import Action, State, decide, state
from .ledger import Ledger
from .loader import Job, Loaded, Loader
from .refresher import Refresher
from .tiers import Found, LocalCopy, Look, TwoTier


@dataclass(frozen=True)
class Result:
    """What a read answered: the value, its entry (``None`` when the value was not
    cacheable and was computed for this caller only), and HIT / STALE / MISS."""

    value: Any
    entry: Entry | None
    status: str


class Region:
    """One per app state; see the module docstring."""

    def __init__(self, tiers: TwoTier, loader: Loader, refresher: Refresher, ledger: Ledger,
                 clock: Callable[[], float], xfetch_beta: float) -> None:
        self.tiers = tiers
        self.loader = loader
        self.refresher = refresher
        self.ledger = ledger
        self.clock = clock
        self.xfetch_beta = xfetch_beta

    # -- what counts as done, per kind of load -------------------------------------------

    def servable(self, entry: Entry) -> bool:
        """Cold miss: somebody stored an entry we may serve as it is."""
        return state(entry.timing, self.clock()) in (State.FRESH, State.STALE)

    def fresh(self, entry: Entry) -> bool:
        """Periodic job: the entry is not due yet."""
        return state(entry.timing, self.clock()) is State.FRESH

    @staticmethod
    def never(entry: Entry) -> bool:
        """Forced refresh (the admin's button, ``forced_update``): always fetch."""
        return False

    # -- reads ---------------------------------------------------------------------------

    def get_or_load(self, job: Job, force: bool = False) -> Result:
        """Read ``job.key`` with stale-while-revalidate semantics (module docstring).

        :param force: load now even if a fresh entry exists (Flask-Caching's
            ``forced_update``).
        :raises HTTPError: the load failed and no stale copy may be served.
        """
        self.ledger.seen(job)
        if force:
            return self._loaded(job, self.loader.load(job, self.never))
        # One mg: the entry, or on a miss the key's cold claim for whoever asked first.
        look = self.tiers.look(job.key, vivify=self.loader.claim_ttl)
        found = look.found
        now = self.clock()
        decision = decide(found.entry.timing if found else None, now, self.xfetch_beta)
        if found is not None and decision.serves_now:
            if decision.action is Action.SERVE_AND_REFRESH:
                self.refresh_later(job, seen=found)
            result = "hit" if decision.state is State.FRESH else "stale"
            metrics.requests_total.labels(job.source, result).inc()
            return Result(found.entry.value, found.entry, result.upper())
        if found is None and (look.claim is not None or look.held):
            lost = self._lost(job, look)
            if lost is not None:
                return lost
        try:
            loaded = self.loader.load(job, self.servable, look)
        except HTTPError:
            fallback = found.entry if found is not None else self.tiers.last_good(job.key)
            if fallback is None or state(fallback.timing, self.clock()) is State.GONE:
                metrics.requests_total.labels(job.source, "miss").inc()
                raise
            # stale-if-error: the fetch failed and the old copy is still allowed (also a
            # copy memcached lost: a flush or a restart must not turn into 502s).
            metrics.requests_total.labels(job.source, "stale").inc()
            return Result(fallback.value, fallback, "STALE")
        return self._loaded(job, loaded)

    def _lost(self, job: Job, look: Look) -> Result | None:
        """memcached lost the entry (a restart, a dead node, an eviction, a flush) while
        this worker still has its last good copy: answer it STALE at once, never wait,
        and refresh it once in the background (here if this read won the claim, else in
        the worker that did). Not a copy that an invalidation superseded (its epoch)."""
        copy = self.tiers.last_good(job.key)
        if copy is None or state(copy.timing, self.clock()) not in (State.FRESH, State.STALE):
            return None
        if look.claim is not None:
            claim = look.claim
            claim.epoch = copy.epoch
            if not self.refresher.schedule(
                    job.key, lambda: self.loader.refresh(job, self.never, claim=claim),
                    job.source, claimed=True):
                self.loader.give_back(claim)  # nobody will fill it: do not make others wait
        metrics.requests_total.labels(job.source, "stale").inc()
        return Result(copy.value, copy, "STALE")

    def local_hit(self, key: str) -> tuple[LocalCopy, str, float] | None:
        """What :meth:`get_or_load` would answer for ``key`` from this worker's copy alone,
        without asking memcached or scheduling anything: ``(copy, "HIT" or "STALE", now)``,
        or ``None`` when the read needs the slow path (no copy within ``l1_ttl``, a key
        the ledger has not seen, a refresh to schedule). For the WSGI fast path.
        """
        tiers = self.tiers
        item = tiers.local.get(key)
        if item is None or tiers.monotonic() - item.checked_at >= tiers.l1_ttl:
            return None
        if self.ledger.get(key) is None:
            return None  # the admin's ledger learns of keys through the slow path
        now = self.clock()
        decision = decide(item.entry.timing, now, self.xfetch_beta)
        if decision.action is Action.SERVE:
            return item, "HIT", now
        if (decision.action is Action.SERVE_AND_REFRESH
                and (self.refresher.is_running(key) or self.loader.held_elsewhere(key))):
            # get_or_load would serve this copy and its refresh_later would find the
            # refresh already running (here, or in another worker that holds the claim):
            # the same answer, without the slow path.
            return item, "HIT" if decision.state is State.FRESH else "STALE", now
        return None

    @staticmethod
    def _loaded(job: Job, loaded: Loaded) -> Result:
        metrics.requests_total.labels(job.source, "miss").inc()
        return Result(loaded.value, loaded.entry, "PASS" if loaded.passed else "MISS")

    # -- background work -------------------------------------------------------------------

    def refresh_later(self, job: Job, seen: Found | None = None) -> bool:
        """Schedule one background refresh of ``job.key`` (one worker of the fleet does it).

        :param seen: the entry the reader saw stale (its CAS fences the write); ``None``
            forces the fetch (the admin's button).
        :return: whether a refresh was scheduled in this worker.
        """
        if seen is not None and self.loader.held_elsewhere(job.key):
            return False  # another worker is refreshing it right now
        return self.refresher.schedule(
            job.key, lambda: self.loader.refresh(job, self.never, seen), job.source)

    def periodic(self, job: Job, every: float) -> None:
        """Recompute ``job`` every ``every`` seconds, by whichever worker holds the lease."""

        def run() -> float:
            try:
                found = self.tiers.read_shared(job.key)
            except CacheUnavailable:
                found = None
            now = self.clock()
            if found is not None and self.fresh(found.entry):
                return max(0.05, found.entry.timing.fresh_until - now)
            self.loader.refresh(job, self.fresh)
            return every

        self.refresher.register(job.key, every, run)

    def invalidate(self, key: str) -> None:
        """Forget ``key`` here and in memcached (other workers: within ``l1_ttl``); no
        worker serves a copy from before now again, not even when the origin fails.

        :raises CacheUnavailable: memcached could not be asked (the local copy is gone).
        """
        self.tiers.delete(key)
        self.loader.forget(key)
