"""An unchanged Flask-Caching app, as a user has it: the drop-in tests and the bench switch
only its configuration (``FLASK_CACHE_*`` environment variables, Flask's prefixed env).

``/report`` asks the origin at ``ORIGIN_URL`` (which counts its requests) and is cached
with ``@cache.cached``: every recompute is one origin request.
"""

from __future__ import annotations

import os
import urllib.request

from flask import Flask
from flask_caching import Cache

app = Flask(__name__)
app.config["CACHE_TYPE"] = "SimpleCache"
app.config.from_prefixed_env()      # FLASK_CACHE_TYPE, FLASK_CACHE_MEMCACHED_SERVERS, ...
cache = Cache(app)
ORIGIN = os.environ.get("ORIGIN_URL", "http://127.0.0.1:9")
DELAY = os.environ.get("ORIGIN_DELAY", "0.5")


@app.get("/report")
@cache.cached()
def report() -> bytes:
    with urllib.request.urlopen(f"{ORIGIN}/report?delay={DELAY}", timeout=30) as answer:
        body: bytes = answer.read()
    return body


@app.get("/healthz")
def healthz() -> str:
    return "ok"
