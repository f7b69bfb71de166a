"""Every exception the service raises, and the JSON error handlers.

The tree, so that callers can catch exactly what they mean::

    ConfigError                      the settings are unusable; start-up stops
                                     (defined in service.config, which imports nothing
                                     of the service; re-exported here)
    ServiceError
    ├── CacheUnavailable             memcached could not be used for this call
    │   ├── PoolTimeout              no pooled connection freed up in time
    │   ├── CircuitOpen              the server failed recently; not asked again yet
    │   └── ItemRefused              CLIENT_ERROR about one item; the server is fine
    ├── CodecError                   bytes read from memcached are not our format
    ├── NotSetUp                     a decorator or SWR used with an app that never
    │                                called swr.init_app (also a RuntimeError)
    ├── TaskError                    a ``python`` source's function in a child process
    │   │                            raised, died, or returned what JSON cannot carry
    │   └── TaskTimeout              it ran past its timeout; the child was killed
    └── HTTPError                    carries an HTTP status for the client
        ├── BadRequest        400    missing or unknown parameters
        ├── NotFound          404    unknown source
        ├── MethodNotAllowed  405
        ├── OriginError       502    the origin failed and no stale copy may be served
        ├── Unavailable       503    this process cannot serve this (memcached down for
        │                            a counter, shutting down)
        └── OriginTimeout     504    the origin did not answer in time

``ConfigError`` stands apart from ``ServiceError``: it is raised before the service exists
(by ``create_app``, the Flask-Caching backend's factory, a gunicorn config, a CLI), and
nothing that serves requests catches it.

Only :class:`HTTPError` reaches a client as itself. Everything else that escapes a view
is a bug, logged with its traceback and answered as a JSON 500.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from .config import ConfigError as ConfigError

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base class of every error raised by this package."""


class CacheUnavailable(ServiceError):
    """memcached could not be used for this call; the caller falls back."""


class PoolTimeout(CacheUnavailable):
    """Every pooled connection stayed checked out for longer than ``pool_timeout``."""


class CircuitOpen(CacheUnavailable):
    """The server failed recently and is skipped until its cool-down has passed."""


class ItemRefused(CacheUnavailable):
    """memcached refused one command about one item (``CLIENT_ERROR``: an ``incr`` of a
    value that is not a number, say); the server is fine and stays in use."""


class CodecError(ServiceError):
    """Bytes read from memcached are not a value this service wrote; treated as a miss."""


class NotSetUp(ServiceError, RuntimeError):
    """The app was never set up with ``swr.init_app(app)``; the message names the
    decorator or object used and the call that is missing."""


class TaskError(ServiceError):
    """The function raised, or its result could not be sent back; the message says which."""


class TaskTimeout(TaskError):
    """The task ran past its timeout; its child process was killed."""


class HTTPError(ServiceError):
    """An error with an HTTP status, answered as ``{"error": ..., "detail": ...}``."""

    status = 500
    error = "internal error"

    def __init__(self, detail: str = "", **extra: Any) -> None:
        super().__init__(detail or self.error)
        self.detail = detail
        self.extra = extra

    def to_response(self) -> Response:
        body: dict[str, Any] = {"error": self.error, "detail": self.detail}
        body.update(self.extra)
        response = jsonify(body)
        response.status_code = self.status
        return response


class BadRequest(HTTPError):
    status = 400
    error = "bad request"


class NotFound(HTTPError):
    status = 404
    error = "not found"


class MethodNotAllowed(HTTPError):
    status = 405
    error = "method not allowed"


class OriginError(HTTPError):
    status = 502
    error = "origin failed"


class Unavailable(HTTPError):
    status = 503
    error = "unavailable"


class OriginTimeout(HTTPError):
    status = 504
    error = "origin timed out"


def _handle_service_error(exc: HTTPError) -> Response:
    return exc.to_response()


def _handle_http_exception(exc: HTTPException) -> Response:
    # Werkzeug's own 404/405/400 (unknown route, wrong method) are answered in the same
    # JSON shape as ours, so clients parse one format.
    response = jsonify({"error": (exc.name or "error").lower(), "detail": exc.description or ""})
    response.status_code = exc.code or 500
    if exc.code == 405 and exc.response is None:
        allowed = getattr(exc, "valid_methods", None)
        if allowed:
            response.headers["Allow"] = ", ".join(allowed)
    return response


def _handle_unexpected(exc: Exception) -> Response:
    log.exception("unhandled error: %s", exc)
    response = jsonify({"error": "internal error", "detail": type(exc).__name__})
    response.status_code = 500
    return response


def init_app(app: Flask) -> None:
    """Answer every error as JSON."""
    app.register_error_handler(HTTPError, _handle_service_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)
