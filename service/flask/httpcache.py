"""HTTP caching headers for answers served through the cache: the one header path.

Every front door (``/v1`` sources, ``@swr.cached`` views) answers through :func:`apply`.
By RFC 9111 a downstream cache computes an answer's age from ``Age`` and compares it with
``max-age``, so ``Cache-Control`` carries the entry's *configured* windows and ``Age``
how long ago it was stored: at age 20 of a 30 s window that is ``max-age=30`` with
``Age: 20`` (10 s of freshness left), never ``max-age=10`` with ``Age: 20``, which a
downstream cache would read as stale. ``X-Cache`` says how the answer was made (HIT,
STALE, MISS) and ``ETag`` identifies the value; an ``If-None-Match`` that matches gets
``304 Not Modified`` without a body.
"""

from __future__ import annotations

import math

from flask import Request, Response

from ..readpath.entry import Entry


def cache_control(entry: Entry) -> str:
    w = entry.windows
    return (f"max-age={math.floor(w.max_age)}, "
            f"stale-while-revalidate={math.floor(w.stale_while_revalidate)}, "
            f"stale-if-error={math.floor(w.stale_if_error)}")


def apply(response: Response, request: Request, entry: Entry | None, status: str,
          now: float) -> Response:
    """Add the cache headers to ``response``; answer 304 for a matching If-None-Match.

    :param entry: the entry answered, or ``None`` for a value computed for this caller
        only (not cacheable): it gets ``X-Cache`` and nothing a downstream cache could
        keep.
    """
    response.headers["X-Cache"] = status
    if entry is None:
        return response
    response.headers["Age"] = str(math.floor(entry.timing.age(now)))
    response.headers["Cache-Control"] = cache_control(entry)
    response.headers["ETag"] = entry.etag
    # If-None-Match uses the weak comparison (RFC 9110 13.1.2): proxies that compress
    # send our ETag back as W/"...". Only an answer we cached has a validator to match.
    if request.method in ("GET", "HEAD") and request.if_none_match.contains_weak(
            entry.etag.strip('"')):
        response.status_code = 304
        response.set_data(b"")
        for header in ("Content-Length", "Content-Type"):
            response.headers.pop(header, None)
    return response
