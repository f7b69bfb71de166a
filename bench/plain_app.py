"""The baseline app of the hit bench: what a user runs without this project, served by
stock ``gunicorn -k gevent`` (no config file, no access log).

It imports nothing of ``service``:

* ``/raw``: a raw WSGI callable answering constant bytes, in front of Flask: the ceiling
  of the server and the machine, the row every other one is a ratio of;
* ``/flask``: a bare Flask view answering the same bytes;
* ``/fc``: the same view under Flask-Caching's ``@cache.cached``, configured as its
  documentation says (``CACHE_TYPE = "MemcachedCache"`` and the servers' addresses; the
  client is python-memcached, one connection per greenlet under gevent): every hit asks
  memcached;
* ``/healthz``: for the bench to know the server is up.

``BENCH_MEMCACHED`` is the memcached's ``host:port``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response
from flask_caching import Cache

BODY = b'{"answer":42,"padding":"' + b"x" * 200 + b'"}'


def create_plain_app() -> Flask:
    app = Flask(__name__)
    cache = Cache(app, config={
        "CACHE_TYPE": "MemcachedCache",
        "CACHE_MEMCACHED_SERVERS": [os.environ.get("BENCH_MEMCACHED", "127.0.0.1:11211")],
        "CACHE_KEY_PREFIX": "bench-plain-",
    })

    @app.get("/flask")
    def bare() -> Response:
        return Response(BODY, mimetype="application/json")

    @app.get("/fc")
    @cache.cached(timeout=3600)
    def flask_caching() -> Response:
        return Response(BODY, mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b"ok", mimetype="text/plain")

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


app = RawInFront(create_plain_app())
