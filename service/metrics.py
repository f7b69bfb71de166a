"""Prometheus metrics, and the ``/metrics`` endpoint aggregated over every gunicorn worker.

Under gunicorn, ``deploy/gunicorn.conf.py`` points ``PROMETHEUS_MULTIPROC_DIR`` at an
empty directory before any worker starts; prometheus_client then keeps each worker's
values in files there, and ``/metrics`` (answered by whichever worker gets the request)
merges them. Without that variable (tests, ``flask run``) the numbers are per process.

The names in SPEC §4 are a contract with dashboards: do not rename them.
"""

from __future__ import annotations

import os

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

requests_total = Counter(
    "cache_requests", "Reads of a cached source by result (hit, stale, miss).",
    ["source", "result"],
)
refreshes_total = Counter(
    "cache_refreshes", "Origin fetches by outcome (ok, error, timeout, skipped).",
    ["source", "outcome"],
)
refresh_seconds = Histogram(
    "cache_refresh_seconds", "Time one origin fetch took.", ["source"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
)
lease_total = Counter(
    "cache_lease", "Fleet-wide lease outcomes (acquired, contended, lost, expired, released,"
    " waited, waited_timeout).", ["outcome"],
)
lease_waits_total = Counter(
    "cache_lease_waits", "Readers that waited for another worker's fetch, by source.",
    ["source"],
)
tier_hits_total = Counter("cache_tier_hits", "Hits by tier (l1, memcached).", ["tier"])
memcached_errors_total = Counter(
    "memcached_errors", "memcached failures by kind (connection, timeout, server, decode,"
    " pool_timeout, circuit_open, too_large).", ["kind"],
)
memcached_call_seconds = Histogram(
    "memcached_call_seconds", "Latency of one memcached command.", ["command"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
pool_in_use = Gauge(
    "memcached_pool_in_use", "memcached connections checked out.", multiprocess_mode="livesum"
)
refreshes_in_flight = Gauge(
    "cache_refreshes_in_flight", "Background refreshes running.", multiprocess_mode="livesum"
)
hub_blocked_total = Counter(
    "gevent_hub_blocked", "Times the gevent hub was blocked past the monitor threshold."
)
large_values_total = Counter(
    "cache_large_values", "Values over the memcached item size (chunked, l1_only).", ["outcome"]
)


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
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encode(registry()), content_type=content_type)

