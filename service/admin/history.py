"""The last hour of the fleet, per minute: what the admin page draws as small charts.

Each worker counts in its own process (the Prometheus counters of :mod:`service.metrics`).
Every ``REPORT_EVERY`` seconds its reporter (:meth:`History.report`, a periodic job of the
worker's refresher, so it starts after fork and stops with the refresher; it also flushes
the worker's registry notes, see :mod:`service.registry`) adds what it counted since its
last report to the current minute's item in memcached: ``history\\0<minute % 60>`` in the
SWR namespace, a ring of 60 items, each ``{"m": minute, "c": {counter: n}}``, merged with
``gets``/``cas`` so workers add up instead of overwriting each other. An item of an older
minute is replaced, not added to. A worker with nothing new to report writes nothing.

What it is, exactly: the sum over every worker of every host of reads (hit, stale, miss),
origin fetches (ok, failed), readers that waited for another worker's fetch, blocked-hub
reports and memcached errors, attributed to the minute in which each worker reported them
(at most ``REPORT_EVERY`` seconds late). A worker killed between two reports loses its last
few seconds; if memcached is down the counts wait in the worker and land later.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent

from ..errors import CacheUnavailable
from ..memcache.store import MISS, Store
from ..observe import metrics
from .numbers import count

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger(__name__)
REPORT_EVERY = 10.0
# After a flush, notes gather this long before the next one (a burst costs one write).
FLUSH_DELAY = 0.25
JOB = "\x00swr-admin-report"
MINUTES = 60
COUNTERS = ("hit", "stale", "miss", "refresh_ok", "refresh_failed", "lease_waits",
            "hub_blocked", "memcached_errors")


def slot_key(minute: int) -> str:
    return f"minute:{minute % MINUTES}"


def _sum(metric: Any, label: str | None = None, values: tuple[str, ...] = ()
         ) -> float:
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total") and not sample.name.endswith("_count"):
                continue
            if label is None or sample.labels.get(label) in values:
                total += sample.value
    return total


def snapshot() -> dict[str, float]:
    """This process's totals of the :data:`COUNTERS` (never the merged multiprocess ones)."""
    return {
        "hit": _sum(metrics.requests_total, "result", ("hit",)),
        "stale": _sum(metrics.requests_total, "result", ("stale",)),
        "miss": _sum(metrics.requests_total, "result", ("miss",)),
        "refresh_ok": _sum(metrics.refreshes_total, "outcome", ("ok",)),
        "refresh_failed": _sum(metrics.refreshes_total, "outcome", ("error", "timeout")),
        "lease_waits": _sum(metrics.lease_total, "outcome", ("waited",)),
        "hub_blocked": _sum(metrics.hub_blocked_total),
        "memcached_errors": _sum(metrics.memcached_errors_total),
    }


class History:
    """See the module docstring.

    :param registry: flushed on each report too (its notes and the hub's reports).
    """

    every = FLUSH_DELAY
    job = JOB

    def __init__(self, store: Store, clock: Callable[[], float],
                 registry: Registry | None = None) -> None:
        self.store = store
        self.clock = clock
        self.registry = registry
        self._reported = snapshot()
        self._ticked = time.monotonic()

    def report(self) -> float:
        """One round of the worker's reporter: wait for registry notes (at most until the
        next count is due), flush them, count when due; the pause before the next round."""
        due = self._ticked + REPORT_EVERY - time.monotonic()
        if self.registry is not None:
            self.registry.wait(max(0.0, due))
            self.registry.flush()
        if time.monotonic() >= self._ticked + REPORT_EVERY:
            self.tick()
        return FLUSH_DELAY

    def tick(self) -> None:
        """Add what this process counted since the last report to the current minute."""
        self._ticked = time.monotonic()
        current = snapshot()
        delta = {k: int(current[k] - self._reported.get(k, 0.0)) for k in COUNTERS}
        delta = {k: v for k, v in delta.items() if v > 0}
        if not delta:
            return
        minute = int(self.clock() // 60)
        try:
            if self._add(minute, delta):
                self._reported = current
        except CacheUnavailable as exc:
            log.info("history: memcached unavailable, counts kept for later: %s", exc)

    def _add(self, minute: int, delta: dict[str, int]) -> bool:
        key = slot_key(minute)
        for attempt in range(5):
            current, token = self.store.gets(key)
            counts: dict[str, int] = {}
            if isinstance(current, dict) and current.get("m") == minute \
                    and isinstance(current.get("c"), dict):
                # A count out of bounds (somebody's garbage) is absent: replaced now.
                counts = {k: v for k, v in current["c"].items()
                          if k in COUNTERS and count(v) is not None}
            for k, v in delta.items():
                counts[k] = counts.get(k, 0) + v
            value = {"m": minute, "c": counts}
            ttl = MINUTES * 60 + 120
            stored = self.store.cas(key, value, token, ttl) if token is not None else None
            if stored is None:
                stored = self.store.add(key, value, ttl)
            if stored:
                return True
            gevent.sleep(0.002 * (attempt + 1) * (0.5 + random.random()))
        return False

    def read(self) -> dict[str, Any]:
        """The last hour, oldest minute first: ``{"minutes": [...], "series": {name: [n]}}``.

        :raises CacheUnavailable: memcached could not be asked.
        """
        now = int(self.clock() // 60)
        minutes = list(range(now - MINUTES + 1, now + 1))
        found = self.store.get_many(slot_key(m) for m in minutes)
        series: dict[str, list[int]] = {k: [] for k in COUNTERS}
        for m in minutes:
            item = found.get(slot_key(m), MISS)
            counts = item.get("c") if isinstance(item, dict) and item.get("m") == m else None
            for k in COUNTERS:
                value = counts.get(k, 0) if isinstance(counts, dict) else 0
                series[k].append(count(value) or 0)
        return {"minutes": [m * 60 for m in minutes], "series": series}
