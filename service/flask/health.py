"""Liveness and readiness probes, and how an app mounts them with ``/metrics``.

``/healthz`` answers 200 while the process serves. ``/readyz`` asks every memcached
server for its version: all answering is ``ok``; otherwise the answer is still 200 with
``degraded`` and the reason, because memcached is shared by the whole fleet and failing
readiness on it would pull every instance out of the load balancer at once, while the
in-process tier and the origins can still answer. 503 is kept for a process that cannot
serve at all (it is shutting down).

The service mounts them in :func:`service.create_app`; any other app that uses
:class:`service.SWR` mounts them with :func:`init_app` (``SWR(app, endpoints=True)`` or
``SWR_ENDPOINTS = True`` in its config): opt-in, because the paths are the app's.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, jsonify

from ..errors import CacheUnavailable
from ..memcache.clients import borrow
from ..observe import metrics
from .state import state_of

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    state = state_of()
    if state.shutting_down:
        return jsonify({"status": "unavailable", "reason": "shutting down"}), 503
    problems: dict[str, str] = {}
    servers: dict[str, Any] = {}
    try:
        with borrow(state.pool) as conn:
            for server in state.pool.servers:
                try:
                    servers[server] = conn.call(server, "version",
                                                lambda c: c.version().decode())
                except CacheUnavailable as exc:  # no pooled connection freed up in time
                    problems[server] = str(exc.__cause__ or exc)
                    servers[server] = None
    except CacheUnavailable as exc:  # no pooled connection freed up in time
        return jsonify({"status": "degraded", "reason": str(exc), "tier": "in-process"}), 200
    if problems:
        reason = "; ".join(f"{s}: {p}" for s, p in problems.items())
        return jsonify({"status": "degraded", "reason": f"memcached unreachable: {reason}",
                        "servers": servers}), 200
    return jsonify({"status": "ok", "servers": servers}), 200


def init_app(app: Flask) -> None:
    """Mount ``/healthz``, ``/readyz`` and ``/metrics`` on ``app``, once (a blueprint of
    that name already registered is left as it is)."""
    for blueprint in (bp, metrics.bp):
        if blueprint.name not in app.blueprints:
            app.register_blueprint(blueprint)
