"""HTTP caching headers for answers served from the cache.

``X-Cache`` says how the answer was made (HIT, STALE, MISS), ``Age`` how old the entry
is, ``ETag`` identifies its value, and ``Cache-Control`` carries the three RFC 5861
windows as what remains of each at the moment of the answer, so a CDN or browser in
front never keeps the answer longer than the service itself would. A request whose
``If-None-Match`` matches the ETag gets ``304 Not Modified`` without a body.
"""

from __future__ import annotations

import math

from flask import Request, Response

from .entry import Entry


def cache_control(entry: Entry, now: float) -> str:
    t = entry.timing
    fresh = max(0.0, t.fresh_until - now)
    stale = max(0.0, t.stale_until - max(now, t.fresh_until))
    error = max(0.0, t.error_until - max(now, t.stale_until))
    return (f"max-age={round(fresh)}, stale-while-revalidate={round(stale)}, "
            f"stale-if-error={round(error)}")


def apply(response: Response, request: Request, entry: Entry, status: str, now: float
          ) -> Response:
    """Add the cache headers to ``response``; answer 304 for a matching If-None-Match."""
    response.headers["X-Cache"] = status
    response.headers["Age"] = str(math.floor(entry.timing.age(now)))
    response.headers["Cache-Control"] = cache_control(entry, now)
    response.headers["ETag"] = entry.etag
    # If-None-Match uses the weak comparison (RFC 9110 13.1.2): proxies that compress
    # send our ETag back as W/"...".
    if response.status_code == 200 and request.if_none_match.contains_weak(
            entry.etag.strip('"')):
        response.status_code = 304
        response.set_data(b"")
        for header in ("Content-Length", "Content-Type"):
            response.headers.pop(header, None)
    return response
