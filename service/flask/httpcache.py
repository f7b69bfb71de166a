"""HTTP caching headers for answers served through the cache: the one header path.

Every front door (``/v1`` sources, ``@swr.cached`` views) answers through :func:`apply`.
By RFC 9111 a downstream cache computes an answer's age from ``Age`` and compares it with
``max-age``, so ``Cache-Control`` carries the entry's *configured* windows and ``Age``
how long ago it was stored: at age 20 of a 30 s window that is ``max-age=30`` with
``Age: 20`` (10 s of freshness left), never ``max-age=10`` with ``Age: 20``, which a
downstream cache would read as stale. ``X-Cache`` says how the answer was made (HIT,
STALE, MISS) and ``ETag`` identifies the value; an ``If-None-Match`` that matches gets
``304 Not Modified`` without a body.

nginx (1.22 and later, as of this writing) ignores ``Age``: it would keep an answer of age
20 for ``max-age=30`` another 30 s. ``X-Accel-Expires``, which only nginx reads (and hides
from its own clients), carries the whole seconds of freshness surely left, so nginx's copy
expires when ours does; nginx still reads the stale windows from ``Cache-Control``, which
must therefore come first (nginx skips ``Cache-Control`` once it has read
``X-Accel-Expires``).
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


def accel_expires(entry: Entry, age: int) -> str:
    """``X-Accel-Expires`` for an answer of whole-second ``age``: the seconds of freshness
    surely left (0, which nginx reads as "do not store", once none is).

    ``age`` was rounded down, so the true age may be up to 1 s more: one second is kept
    back, and nginx's copy never outlives ``max_age`` by more than its own clock's second.
    """
    return str(max(0, math.floor(entry.windows.max_age) - age - 1))


CACHE_NAME = "swr-cache"
"""This cache's name in RFC 9211's ``Cache-Status`` (a downstream cache adds its own)."""


def cache_status(status: str, entry: Entry | None, age: int) -> str:
    """RFC 9211's ``Cache-Status`` for an answer ``X-Cache`` calls ``status``.

    ``hit`` with the freshness left (``ttl``, negative once stale) for HIT and STALE (a
    stale one says ``detail=stale``); ``fwd=uri-miss`` for an answer fetched for this
    request, with ``stored`` when it was stored, or ``detail=uncacheable`` when it may not
    be (``X-Cache: PASS``). The ``ttl`` is counted from the ``Age`` sent, so both agree.
    """
    if entry is None:
        detail = "; detail=uncacheable" if status == "PASS" else ""
        return f"{CACHE_NAME}; fwd=uri-miss{detail}"
    ttl = math.floor(entry.windows.max_age) - age
    if status == "HIT":
        return f"{CACHE_NAME}; hit; ttl={ttl}"
    if status == "STALE":
        return f"{CACHE_NAME}; hit; ttl={ttl}; detail=stale"
    return f"{CACHE_NAME}; fwd=uri-miss; stored; ttl={ttl}"


def apply(response: Response, request: Request, entry: Entry | None, status: str,
          now: float) -> Response:
    """Add the cache headers to ``response``; answer 304 for a matching If-None-Match.

    :param entry: the entry answered, or ``None`` for a value computed for this caller
        only (not cacheable): it gets ``X-Cache`` and nothing a downstream cache could
        keep.
    """
    response.headers["X-Cache"] = status
    if entry is None:
        response.headers["Cache-Status"] = cache_status(status, None, 0)
        return response
    age = math.floor(entry.timing.age(now))
    response.headers["Cache-Status"] = cache_status(status, entry, age)
    response.headers["Age"] = str(age)
    response.headers["Cache-Control"] = cache_control(entry)
    response.headers["X-Accel-Expires"] = accel_expires(entry, age)   # after Cache-Control
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
