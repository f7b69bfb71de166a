"""A Flask-Caching user's app moved to stale-while-revalidate: the README's example.

Run it:  gunicorn -c deploy/gunicorn.conf.py examples.quickstart:app
It needs no settings file: the memcached servers come from Flask's config, here from the
environment (FLASK_CACHE_MEMCACHED_SERVERS='["10.0.0.5:11211"]'), 127.0.0.1:11211 by default.
"""

from __future__ import annotations

import hashlib
import time

from flask import Flask, jsonify, request

from service import SWR

app = Flask(__name__)
app.config["CACHE_MEMCACHED_SERVERS"] = ["127.0.0.1:11211"]
app.config.from_prefixed_env()   # FLASK_CACHE_MEMCACHED_SERVERS, FLASK_CACHE_KEY_PREFIX...
swr = SWR()


def build_report(region: str) -> dict[str, object]:
    """Stands in for the expensive part: a slow query, an upstream API, a fan-out."""
    digest = hashlib.sha256(region.encode())
    for _ in range(200_000):
        digest = hashlib.sha256(digest.digest())
    return {"region": region, "checksum": digest.hexdigest()[:12], "built_at": time.time()}


@app.get("/report")
@swr.cached(max_age=60, stale_while_revalidate=600, stale_if_error=3600)
def report():  # type: ignore[no-untyped-def]
    # Runs once per window for the whole fleet; readers of a stale entry get it at once.
    return jsonify(build_report(request.args.get("region", "eu")))


@swr.memoize(max_age=300, stale_while_revalidate=3600)
def user_name(user_id: int) -> str:
    # Keyed by its arguments, inside a request too: user_name(1) and user_name(2) differ.
    return f"user-{user_id}"


@app.get("/users/<int:user_id>")
def user(user_id: int):  # type: ignore[no-untyped-def]
    return jsonify(name=user_name(user_id))


@swr.periodic("exchange-rates", every=3600)
def exchange_rates() -> dict[str, float]:
    # The deque refilled by APScheduler, done right: one worker of the fleet recomputes
    # it every hour, the value lives in memcached, every worker reads the same one.
    return {"EUR": 1.0, "USD": 1.08, "computed_at": time.time()}


@app.get("/rates")
def rates():  # type: ignore[no-untyped-def]
    return jsonify(swr.value("exchange-rates"))   # never waits, except on a cold cache


@app.get("/legacy")
@swr.cache.cached(timeout=60)                       # plain Flask-Caching keeps working
def legacy() -> str:
    return f"cached at {time.time()}"


swr.init_app(app)   # defaults, then app.config, then SERVICE_SETTINGS if it is set
