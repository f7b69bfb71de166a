"""Prometheus metrics, and the ``/metrics`` endpoint aggregated over every gunicorn worker.

Under gunicorn, ``deploy/gunicorn.conf.py`` points ``PROMETHEUS_MULTIPROC_DIR`` at an
empty directory before any worker starts; prometheus_client then keeps each worker's
values in files there, and ``/metrics`` (answered by whichever worker gets the request)
merges them. Without that variable (tests, ``flask run``) the numbers are per process.

In that mode prometheus_client writes an mmapped file on every update, under a lock: on
the hot path of a cache hit that cost more than the hit. So there, each metric is fronted
by :class:`Buffered`: a worker adds up its updates in memory and a background flusher
(a greenlet under gevent, started in the worker on first use, never in the master) hands
the sums to prometheus_client every ``FLUSH_INTERVAL`` seconds, at worker exit
(:func:`flush`, called by ``service.worker``) and before this worker answers
``/metrics``. Sums are exact; other workers' updates show within ``FLUSH_INTERVAL``.

The names below are a contract with dashboards (the README lists them): do not rename them.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
from typing import Any

from flask import Blueprint, Response, request
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.exposition import choose_encoder

bp = Blueprint("metrics", __name__)
log = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class _Pending:
    """One labelled child's updates since the last flush."""

    __slots__ = ("target", "amount", "sum", "counts")

    def __init__(self, target: Any) -> None:
        self.target = target
        self.amount = 0.0                      # counters and gauges: inc minus dec
        self.sum = 0.0                         # histograms: sum and per-bucket counts
        self.counts: list[int] | None = None

    def inc(self, amount: float = 1.0) -> None:
        self.amount += amount

    def dec(self, amount: float = 1.0) -> None:
        self.amount -= amount

    def observe(self, value: float) -> None:
        bounds = self.target._upper_bounds
        if self.counts is None:
            self.counts = [0] * len(bounds)
        self.sum += value
        # The first bucket whose bound is >= value, as Histogram.observe picks it.
        self.counts[bisect.bisect_left(bounds, value)] += 1

    def flush(self) -> None:
        # Swapped out before any call that could yield, so no update is lost or counted
        # twice when a greenlet switch happens inside prometheus_client's lock.
        amount, self.amount = self.amount, 0.0
        total, self.sum = self.sum, 0.0
        counts, self.counts = self.counts, None
        if amount > 0:
            self.target.inc(amount)
        elif amount < 0:
            self.target.dec(-amount)
        if counts is not None:
            # Histogram.observe does exactly this per observation: sum, then one bucket.
            self.target._sum.inc(total)
            for bucket, n in zip(self.target._buckets, counts, strict=True):
                if n:
                    bucket.inc(n)


class Buffered:
    """A Counter, Gauge (inc/dec) or Histogram whose updates a worker adds up in memory
    until :func:`flush`. With ``buffered=False`` every update goes straight through."""

    def __init__(self, metric: Any, buffered: bool = MULTIPROCESS) -> None:
        self.metric = metric
        self.buffered = buffered
        self._children: dict[tuple[str, ...], Any] = {}
        _all.append(self)

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            target = self.metric.labels(*values) if values else self.metric
            child = self._children[values] = _Pending(target) if self.buffered else target
            if self.buffered:
                _ensure_flusher()
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self.labels().dec(amount)

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def collect(self) -> Any:
        """The metric's samples, this process's pending updates included."""
        self.flush()
        return self.metric.collect()

    def flush(self) -> None:
        if self.buffered:
            for child in list(self._children.values()):
                child.flush()


_all: list[Buffered] = []
_flusher: tuple[int, threading.Event, threading.Thread] | None = None
flushed = threading.Event()
"""Set after each periodic flush (tests wait on it instead of sleeping)."""


def flush() -> None:
    """Hand every buffered update of this process to prometheus_client now."""
    for metric in _all:
        metric.flush()


def _ensure_flusher() -> None:
    """Start this process's flusher once (after fork: the parent's did not survive it)."""
    global _flusher
    if _flusher is not None and _flusher[0] == os.getpid():
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(FLUSH_INTERVAL):
            try:
                flush()
            except Exception as exc:  # noqa: BLE001 - metrics must never take the worker down
                log.exception("flushing metrics to %s failed: %s: %s",
                              os.environ.get("PROMETHEUS_MULTIPROC_DIR", "memory"),
                              type(exc).__name__, exc)
            flushed.set()

    # Under gevent (patched) this is a greenlet of the worker; a daemon either way.
    thread = threading.Thread(target=loop, name="metrics-flusher", daemon=True)
    _flusher = (os.getpid(), stop, thread)
    thread.start()


def stop_flusher() -> None:
    """Flush once more and stop this process's flusher (worker exit, tests)."""
    global _flusher
    flusher, _flusher = _flusher, None
    if flusher is not None and flusher[0] == os.getpid():
        flusher[1].set()
        flusher[2].join(timeout=5)
    flush()


requests_total = Buffered(Counter(
    "cache_requests", "Reads of a cached source by result (hit, stale, miss).",
    ["source", "result"],
))
refreshes_total = Buffered(Counter(
    "cache_refreshes", "Origin fetches by outcome (ok, error, timeout, skipped).",
    ["source", "outcome"],
))
refresh_seconds = Buffered(Histogram(
    "cache_refresh_seconds", "Time one origin fetch took.", ["source"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
))
lease_total = Buffered(Counter(
    "cache_lease", "Fleet-wide lease outcomes (acquired, contended, lost, expired, released,"
    " waited, waited_timeout).", ["outcome"],
))
lease_waits_total = Buffered(Counter(
    "cache_lease_waits", "Readers that waited for another worker's fetch, by source.",
    ["source"],
))
tier_hits_total = Buffered(Counter("cache_tier_hits", "Hits by tier (l1, memcached).",
                                     ["tier"]))
memcached_errors_total = Buffered(Counter(
    "memcached_errors", "memcached failures by kind (connection, timeout, server, decode,"
    " pool_timeout, circuit_open, too_large).", ["kind"],
))
memcached_call_seconds = Buffered(Histogram(
    "memcached_call_seconds", "Latency of one memcached command.", ["command"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
))
pool_in_use = Buffered(Gauge(
    "memcached_pool_in_use", "memcached connections checked out.", multiprocess_mode="livesum"
))
refreshes_in_flight = Buffered(Gauge(
    "cache_refreshes_in_flight", "Background refreshes running.", multiprocess_mode="livesum"
))
hub_blocked_total = Counter(
    "gevent_hub_blocked", "Times the gevent hub was blocked past the monitor threshold."
)
large_values_total = Buffered(Counter(
    "cache_large_values", "Values over the memcached item size (chunked, l1_only, shared).",
    ["outcome"]
))


def registry() -> CollectorRegistry:
    """The registry to expose: merged over workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return merged
    from prometheus_client import REGISTRY

    return REGISTRY


@bp.get("/metrics")
def metrics_view() -> Response:
    """The metrics in the format the scraper asks for, with that format's exact Content-Type.

    ``choose_encoder`` is prometheus_client's own negotiation (OpenMetrics when the
    ``Accept`` header asks for it, else the text format 0.0.4) and returns a complete
    Content-Type, charset included. It is passed as ``content_type``: given as ``mimetype``,
    Flask would append a second ``; charset=utf-8``.
    """
    flush()  # this worker's own updates, exactly; the others' within FLUSH_INTERVAL
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encode(registry()), content_type=content_type)

