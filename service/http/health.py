"""Liveness and readiness probes.

``/healthz`` answers 200 while the process serves. ``/readyz`` asks every memcached
server for its version: all answering is ``ok``; otherwise the answer is still 200 with
``degraded`` and the reason, because memcached is shared by the whole fleet and failing
readiness on it would pull every instance out of the load balancer at once, while the
in-process tier and the origins can still answer. 503 is kept for a process that cannot
serve at all (it is shutting down).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from ..errors import CacheUnavailable
from ..flask.state import state_of
from ..memcache.clients import borrow

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
