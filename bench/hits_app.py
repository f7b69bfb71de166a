"""The hit bench's app: one gunicorn app serving the same small answer five ways.

``gunicorn -c deploy/gunicorn.conf.py bench.hits_app:app`` serves:

* ``/raw``: a raw WSGI callable answering constant bytes, in front of everything: the
  ceiling of this server and machine;
* ``/flask``: a bare Flask view answering the same bytes;
* ``/fc``: Flask-Caching's own ``MemcachedCache`` ``@cache.cached`` over a pymemcache
  ``PooledClient`` (the baseline the issue compares with: it asks memcached every time);
* ``/v1/const``: the service's ``/v1`` source (a ``python`` source, cached);
* ``/swr``: a view decorated with ``@swr.cached``;
* ``/v1/slow?id=N``: a source whose origin takes ``BENCH_SLOW_SECONDS`` (default 1 s): the
  cold key 300 readers hit at once;
* ``/v1/herd``: one hot key whose origin takes ``BENCH_HERD_SECONDS`` (default 3 s) and
  appends when it started and ended (wall clock) to the file ``BENCH_HERD_LOG``, so the
  bench knows every fetch of the fleet and which reads overlapped one.

``SERVICE_SETTINGS`` names the settings file (the bench writes it, with the sources).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response
from flask_caching import Cache
from pymemcache import serde
from pymemcache.client.base import PooledClient

from service import create_app
from service.app import swr

BODY = b'{"answer":42,"padding":"' + b"x" * 200 + b'"}'


def const() -> dict[str, Any]:
    """The ``/v1/const`` source (``target = "bench.hits_app:const"``)."""
    return {"answer": 42, "padding": "x" * 200}


def slow(id: str = "") -> dict[str, Any]:  # noqa: A002 - the query parameter's name
    """The ``/v1/slow`` source: an origin that takes a while (runs in the thread pool)."""
    time.sleep(float(os.environ.get("BENCH_SLOW_SECONDS", "1")))
    return {"id": id, "at": time.time()}


def herd() -> dict[str, Any]:
    """The ``/v1/herd`` source: a slow origin that records each fetch (any worker)."""
    started = time.time()
    time.sleep(float(os.environ.get("BENCH_HERD_SECONDS", "3")))
    ended = time.time()
    log = os.environ.get("BENCH_HERD_LOG")
    if log:
        # One short O_APPEND write per fetch: lines from two workers never interleave.
        with open(log, "a", encoding="ascii") as f:
            f.write(f"{started:.6f} {ended:.6f}\n")
    return {"answer": 42, "at": ended}


def create_hits_app() -> Flask:
    app = create_app()
    memcached = app.extensions["service"].settings.cache.servers[0]
    host, port = memcached.rsplit(":", 1)
    client = PooledClient((host, int(port)), serde=serde.pickle_serde, max_pool_size=64,
                          connect_timeout=1.0, timeout=1.0, no_delay=True)
    fc = Cache(app, config={"CACHE_TYPE": "MemcachedCache", "CACHE_MEMCACHED_SERVERS": client,
                            "CACHE_KEY_PREFIX": "bench-fc-"})

    @app.get("/flask")
    def bare() -> Response:
        return Response(BODY, mimetype="application/json")

    @app.get("/fc")
    @fc.cached(timeout=3600)
    def flask_caching() -> Response:
        return Response(BODY, mimetype="application/json")

    @app.get("/swr")
    @swr.cached(max_age=3600)
    def swr_view() -> Response:
        return Response(BODY, mimetype="application/json")

    return app


class RawInFront:
    """``/raw`` answered before anything else; every other path goes to ``app``."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.headers = [("Content-Type", "application/json"),
                        ("Content-Length", str(len(BODY)))]

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/raw":
            start_response("200 OK", self.headers)
            return [BODY]
        return self.app(environ, start_response)


flask_app = create_hits_app()
app = RawInFront(flask_app)
