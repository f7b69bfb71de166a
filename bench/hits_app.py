"""The hit bench's app: the service, serving the same small answer four ways.

``gunicorn -c deploy/gunicorn.conf.py bench.hits_app:app`` serves:

* ``/raw``: a raw WSGI callable answering constant bytes, in front of everything: what
  the server costs with our config, beside the same callable on stock gunicorn
  (``bench/plain_app.py``, which also serves the bare Flask and Flask-Caching rows);
* ``/flask``: a bare Flask view answering the same bytes, in the service's app (our Flask
  extension's hooks run for it);
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
from typing import Any

from flask import Flask, Response

from service import create_app
from service.app import swr

from .plain_app import BODY, RawInFront


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

    @app.get("/flask")
    def bare() -> Response:
        return Response(BODY, mimetype="application/json")

    @app.get("/swr")
    @swr.cached(max_age=3600)
    def swr_view() -> Response:
        return Response(BODY, mimetype="application/json")

    return app


flask_app = create_hits_app()
app = RawInFront(flask_app)
