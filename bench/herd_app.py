"""The herd bench's app: one slow view cached two ways over the same memcached.

``gunicorn -c deploy/gunicorn.conf.py bench.herd_app:app`` serves:

* ``/plain``: plain Flask-Caching ``@cache.cached(timeout=TTL)``. When the entry expires,
  every request that arrives before somebody stored a new one recomputes it.
* ``/swr``: ``@swr.cached(max_age=TTL, stale_while_revalidate=60, stale_if_error=600)``.
* ``/count``: how many times each view ran (fleet-wide counters in memcached), and with
  ``?starts=1`` when each run started.

The "origin" is ``gevent.sleep(BENCH_VIEW_SECONDS)``: an I/O wait, like a slow upstream,
so a gevent worker keeps serving other requests meanwhile. Each run of the view first
increments a memcached counter, so ``/count`` adds up every worker's recomputes.

Environment: ``SERVICE_SETTINGS`` (the settings file), ``BENCH_VIEW_SECONDS`` (default 3)
and ``BENCH_TTL`` (default 5).
"""

from __future__ import annotations

import os
import time
from typing import Any

import gevent
from flask import Flask, Response, jsonify, request

from service import create_app
from service.app import cache, swr
from service.config import Settings

PLAIN_COUNTER = "bench:plain:fetches"
SWR_COUNTER = "bench:swr:fetches"


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = float(raw)
    if not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def create_herd_app(settings: Settings | None = None) -> Flask:
    """The service's app (health, metrics, the SWR extension) plus the bench's routes."""
    view_seconds = _env_seconds("BENCH_VIEW_SECONDS", 3.0)
    ttl = _env_seconds("BENCH_TTL", 5.0)
    app = create_app(settings)

    def slow_origin(counter: str) -> dict[str, Any]:
        # Counted when the recompute starts: that is when the origin is hit. The start
        # time is kept too, so the bench can show when each recompute happened.
        started = time.time()
        fetch = cache.cache.inc(counter)
        if fetch is not None:
            cache.set(f"{counter}:{fetch}", [started, os.getpid()], timeout=3600)
        gevent.sleep(view_seconds)
        return {"fetch": fetch, "pid": os.getpid(), "computed_at": time.time()}

    @app.get("/plain")
    @cache.cached(timeout=ttl)
    def plain() -> dict[str, Any]:
        return slow_origin(PLAIN_COUNTER)

    @app.get("/swr")
    @swr.cached(max_age=ttl, stale_while_revalidate=60, stale_if_error=600)
    def swr_view() -> dict[str, Any]:
        return slow_origin(SWR_COUNTER)

    @app.get("/count")
    def count() -> Response:
        """Both counters; with ``?starts=1`` also when each recompute started
        (``[unix time, pid]`` by counter value)."""
        store = cache.cache.store
        doc: dict[str, Any] = {"view_seconds": view_seconds, "ttl": ttl}
        for name, counter in (("plain", PLAIN_COUNTER), ("swr", SWR_COUNTER)):
            n = store.get_counter(counter) or 0
            doc[name] = n
            if request.args.get("starts"):
                keys = [f"{counter}:{i}" for i in range(1, n + 1)]
                doc[f"{name}_starts"] = {
                    str(i): v for i, v in zip(range(1, n + 1), cache.get_many(*keys),
                                              strict=True) if v is not None}
        return jsonify(doc)

    return app


app = create_herd_app()
