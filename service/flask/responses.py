"""Responses as cache values: the one rule for "is this cacheable", and their stored form.

Used by ``@swr.cached`` views and by ``/v1`` http sources, so both front doors store
exactly the same kind of answer. By default a response is cacheable when its status is
2xx other than 206 (a partial answer to a range request), as the README says and Flask-Caching's
``response_filter`` idea have it; a ``response_filter`` replaces the status rule. Never
cacheable, whatever the filter says: a response that sets a cookie (one user's session
served to everybody), a streamed one (it cannot be replayed), and one that says
``Cache-Control: no-store`` or ``private``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import gevent
from flask import Response
from werkzeug.wrappers import Response as BaseResponse

ResponseFilter = Callable[[Response], bool]

# Headers that describe one transfer, not the resource: never stored, never replayed.
_NOT_STORED = frozenset({
    "set-cookie", "date", "content-length", "connection", "keep-alive", "transfer-encoding",
    "x-cache", "age", "cache-control", "etag",
})


# A body this large is written to the client a piece at a time (see body_response).
STREAMED_FROM = 1024 * 1024


def body_response(body: bytes, status: int, content_type: str) -> Response:
    """The response that sends ``body`` (a cached origin's answer, say).

    A large body is handed to the server a piece of :data:`STREAMED_FROM` bytes at a
    time, with a turn of the loop for the worker's other requests after each: one
    ``sendall`` of 50 MB to a client that reads as fast as it comes (on loopback, say)
    never waits, so never yields, and would hold the hub for the whole copy. The pieces
    are slices of the one cached body; Content-Length is the whole.
    """
    if len(body) < STREAMED_FROM:
        return Response(body, status=status, content_type=content_type)
    response = Response(_in_pieces(body), status=status, content_type=content_type)
    response.headers["Content-Length"] = str(len(body))
    return response


def _in_pieces(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), STREAMED_FROM):
        yield body[start : start + STREAMED_FROM]
        gevent.sleep(0)  # the worker's other requests run between two pieces


def default_status_rule(status: int) -> bool:
    return 200 <= status < 300 and status != 206


def shareable(response: BaseResponse) -> bool:
    """Whether ``response`` may be served to anyone but its own request: not one that
    sets a cookie, says ``private`` or ``no-store``, or streams."""
    if "Set-Cookie" in response.headers or response.is_streamed or response.direct_passthrough:
        return False
    directives = response.cache_control
    return not (directives.no_store or directives.private)


def cacheable(response: Response, response_filter: ResponseFilter | None = None) -> bool:
    """Whether ``response`` may be stored and served to other requests."""
    if not shareable(response):
        return False
    if response_filter is not None:
        return bool(response_filter(response))
    return default_status_rule(response.status_code)


def freeze(response: Response) -> dict[str, Any]:
    """The stored form of a response: status, the headers worth replaying, the body."""
    return {
        "status": response.status_code,
        "headers": [[k, v] for k, v in response.headers.items()
                    if k.lower() not in _NOT_STORED],
        "body": response.get_data(),
    }


def thaw(stored: Any) -> Response:
    """A new response from :func:`freeze`'s form (each reader gets its own object).

    :raises ValueError: ``stored`` is not that form (a value written by something else).
    """
    if not isinstance(stored, dict):
        raise ValueError("not a stored response")
    status, headers, body = stored.get("status"), stored.get("headers"), stored.get("body")
    if not isinstance(status, int) or not isinstance(body, bytes) or not isinstance(
            headers, list):
        raise ValueError("not a stored response")
    response = Response(body, status=status)
    response.headers.clear()
    for pair in headers:
        if (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
                and not any(c in x for x in pair for c in "\r\n\x00")):
            response.headers.add(pair[0], pair[1])
    return response
