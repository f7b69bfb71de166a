"""The admin's statistics, shaped for an operator.

Each part says what it covers (``scope`` in the answer):

* per source, per tier, leases, memcached errors: the Prometheus counters of
  :mod:`service.metrics`, merged over this host's workers like ``/metrics`` (another host
  of the fleet has its own): requests and the hit / stale / miss ratios, origin fetches by
  outcome, readers that waited for another worker's fetch, and the histogram's bucket
  bounds of the fetch times (``refresh_seconds``: "p50 ≤ 2.5 s", never a value
  interpolated inside a bucket);
* fetch-time percentiles from observed durations (``fetch_seconds``): the time the last
  fetch of each entry the registry lists took, per source, the whole fleet;
* per memcached server: up or down, this worker's circuit breaker, and the server's own
  ``stats`` (items, memory used of its limit, evictions, connections, hit ratio);
* the latest refresh failures and blocked-hub reports, and the last hour per minute:
  the whole fleet, from memcached (:mod:`service.registry`, :mod:`service.history`).
"""

from __future__ import annotations

import base64
import math
from functools import cache
from importlib import resources
from typing import Any

from ..errors import CacheUnavailable
from ..flask.state import AppState
from ..memcache.clients import borrow
from ..observe import metrics, monitor
from . import entries as adminentries
from .history import History
from .install import registry_of
from .numbers import count
from .registry import Record

QUANTILES = (0.5, 0.9, 0.99)
SERVER_STATS = ("version", "uptime", "curr_items", "bytes", "limit_maxbytes", "evictions",
                "curr_connections", "get_hits", "get_misses")


@cache
def asset(name: str) -> str:
    """A file of the page (``service/admin/assets/``), read once."""
    return (resources.files("service.admin") / "assets" / name).read_text("utf-8")


@cache
def favicon() -> str:
    """The page's icon as a ``data:`` URI (``assets/favicon.svg``): no extra request, and
    no 404 for ``/favicon.ico`` in the browser's console."""
    svg = asset("favicon.svg").strip().encode("utf-8")
    return "data:image/svg+xml;base64," + base64.b64encode(svg).decode("ascii")


def collect(st: AppState) -> dict[str, Any]:
    out: dict[str, Any] = {
        "scope": {
            "sources": "this host's workers (like /metrics)",
            "servers": "every memcached server, asked now",
            "errors": "the whole fleet", "hub": "the whole fleet",
            "history": "the whole fleet, per minute, the last hour",
        },
        **counters(),
        "servers": servers(st),
        "answered_by": adminentries.answered_by(),
        "fetch_seconds": observed(adminentries.records(st)[0]),
    }
    history: History | None = st.extra.get("history")
    registry = registry_of(st)
    if registry is not None:
        registry.flush()            # this worker's own notes are in the answer too
    try:
        if history is not None:
            history.tick()          # and what it counted so far is in the charts
            out["history"] = history.read()
        out["errors"] = registry.errors() if registry is not None else []
        out["hub"] = registry.hub_events() if registry is not None else []
    except CacheUnavailable as exc:
        out.setdefault("history", None)
        out["errors"], out["scope"]["errors"] = [], f"unavailable: {exc}"
        out["hub"] = [dict(e, t=e["at"]) for e in monitor.recent]
        out["scope"]["hub"] = "this worker only (memcached unavailable)"
    return out


def counters() -> dict[str, Any]:
    """Counters from :mod:`service.metrics`, reshaped per source and per tier."""
    sources: dict[str, dict[str, Any]] = {}
    buckets: dict[str, dict[float, float]] = {}
    out: dict[str, Any] = {"tiers": {}, "leases": {}, "memcached_errors": {},
                           "refreshes_in_flight": 0.0, "pool_in_use": 0.0}

    def src(name: str) -> dict[str, Any]:
        return sources.setdefault(name, {"requests": {"hit": 0.0, "stale": 0.0, "miss": 0.0},
                                         "refreshes": {}, "lease_waits": 0.0})

    for family in metrics.registry().collect():
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "cache_requests_total":
                req = src(labels["source"])["requests"]
                req[labels["result"]] = req.get(labels["result"], 0.0) + value
            elif name == "cache_refreshes_total":
                ref = src(labels["source"])["refreshes"]
                ref[labels["outcome"]] = ref.get(labels["outcome"], 0.0) + value
            elif name == "cache_lease_waits_total":
                src(labels["source"])["lease_waits"] += value
            elif name == "cache_refresh_seconds_bucket":
                per = buckets.setdefault(labels["source"], {})
                le = float(labels["le"])
                per[le] = per.get(le, 0.0) + value
            elif name == "cache_tier_hits_total":
                out["tiers"][labels["tier"]] = out["tiers"].get(labels["tier"], 0) + value
            elif name == "cache_lease_total":
                out["leases"][labels["outcome"]] = out["leases"].get(labels["outcome"], 0) \
                    + value
            elif name == "memcached_errors_total":
                kind = labels["kind"]
                out["memcached_errors"][kind] = out["memcached_errors"].get(kind, 0) + value
            elif name == "cache_refreshes_in_flight":
                out["refreshes_in_flight"] += value
            elif name == "memcached_pool_in_use":
                out["pool_in_use"] += value
    for name, info in sources.items():
        req = info["requests"]
        total = sum(req.values())
        info["requests"]["total"] = total
        info["ratios"] = {k: (req[k] / total if total else None)
                          for k in ("hit", "stale", "miss")}
        info["refresh_seconds"] = percentiles(buckets.get(name, {}))
    tiers = out["tiers"]
    tier_total = sum(tiers.values())
    out["tiers"] = {t: {"hits": n, "share": n / tier_total if tier_total else None}
                    for t, n in tiers.items()}
    out["sources"] = dict(sorted(sources.items()))
    return out


def percentiles(cumulative: dict[float, float]) -> dict[str, Any]:
    """The bucket bound under which each quantile lies, from a histogram's cumulative
    buckets (``{le: count}``): ``p50 = 2.5`` reads "half the fetches took at most 2.5 s".

    Not interpolated inside a bucket (Prometheus' ``histogram_quantile`` does): with
    buckets 1 and 2.5 s, 1.0 s fetches would read 1.8 / 2.4 / 2.5 s. A quantile in the
    ``+Inf`` bucket is ``inf`` ("more than the largest bound"; JSON has no infinity, so
    it is sent as ``null`` with ``over`` set to that bound).
    """
    bounds = sorted(cumulative)
    count = cumulative.get(math.inf, cumulative[bounds[-1]] if bounds else 0.0)
    out: dict[str, Any] = {"count": count, "basis": "bucket bounds", "over": None}
    finite = [le for le in bounds if not math.isinf(le)]
    for q in QUANTILES:
        name = f"p{round(q * 100)}"
        out[name] = None
        if not count:
            continue
        for le in bounds:
            if cumulative[le] >= q * count:
                if math.isinf(le):
                    out["over"] = finite[-1] if finite else 0.0
                else:
                    out[name] = le
                break
    return out


def observed(recs: list[Record]) -> dict[str, dict[str, Any]]:
    """Per source, percentiles of the observed fetch times: how long the last fetch of
    each listed entry took (the registry's ``f``), nearest rank, never interpolated."""
    durations: dict[str, list[float]] = {}
    for rec in recs:
        f = rec.get("f")
        # Read from memcached: only a finite, non-negative number of seconds counts.
        if isinstance(f, int | float) and not isinstance(f, bool) and math.isfinite(f) \
                and f >= 0:
            durations.setdefault(rec["s"], []).append(float(f))
    return {source: nearest_rank(sorted(values)) for source, values in durations.items()}


def nearest_rank(ordered: list[float]) -> dict[str, Any]:
    """``p50``/``p90``/``p99`` of sorted samples, each one of the samples (the smallest
    with at least that share of the samples at or below it)."""
    out: dict[str, Any] = {"count": len(ordered), "basis": "observed"}
    for q in QUANTILES:
        out[f"p{round(q * 100)}"] = (ordered[max(0, math.ceil(q * len(ordered)) - 1)]
                                     if ordered else None)
    return out


def servers(st: AppState) -> list[dict[str, Any]]:
    """Every memcached server: up, breaker, and its own ``stats``."""
    out = []
    now = st.pool.monotonic()
    try:
        with borrow(st.pool) as conn:
            for server in st.pool.servers:
                row: dict[str, Any] = {"server": server}
                try:
                    raw = conn.call(server, "stats", lambda c: c.stats())
                    row.update(up=True, **_server_stats(raw))
                except CacheUnavailable as exc:
                    row.update(up=False, error=str(exc))
                row["breaker"] = st.pool.breakers[server].state(now)
                out.append(row)
    except CacheUnavailable as exc:
        out = [{"server": s, "up": False, "error": str(exc),
                "breaker": st.pool.breakers[s].state(now)} for s in st.pool.servers]
    return out


def _server_stats(raw: dict[Any, Any]) -> dict[str, Any]:
    stats = {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in raw.items()}
    out: dict[str, Any] = {}
    for name in SERVER_STATS:
        value = stats.get(name)
        if name == "version":
            out[name] = value.decode("ascii", "replace")[:64] \
                if isinstance(value, bytes) else None
        else:   # the server's numbers, checked like any read from memcached
            out[name] = count(value)
    hits, misses = out.get("get_hits") or 0, out.get("get_misses") or 0
    out["hit_ratio"] = hits / (hits + misses) if hits + misses else None
    limit = out.get("limit_maxbytes") or 0
    out["memory_used"] = (out.get("bytes") or 0) / limit if limit else None
    return out
