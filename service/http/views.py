"""The ``/v1`` routes: list the sources, read one, bump a counter. Thin on purpose.

``GET /v1/NAME?params`` validates the parameters against the source, builds a
:class:`~service.loader.Job` with the shared key builder, reads it through the app's
:class:`~service.region.Region` (fresh, stale-while-revalidate, stale-if-error), and
answers through the shared header path (:mod:`service.httpcache`). An http source's
answer is cached only when it is cacheable by the same rule as a decorated view's
(:mod:`service.responses`); any other answer below 500 is passed through uncached.
"""

from __future__ import annotations

import hashlib
from typing import Any

import gevent
import orjson
from flask import Blueprint, Flask, Response, jsonify, request

from ..errors import BadRequest, CacheUnavailable, NotFound, Unavailable
from ..flask.fastpath import register_source_view
from ..flask.httpcache import apply
from ..flask.responses import body_response, default_status_rule
from ..flask.state import AppState, state_of
from ..readpath import keying
from ..readpath.entry import Entry
from ..readpath.freshness import Timing
from ..readpath.loader import UNCACHEABLE, Job
from ..readpath.region import Result
from .counters import Counters
from .sources import Fetchers, Source, build_sources

bp = Blueprint("v1", __name__, url_prefix="/v1")
MAX_COUNTER_NAME = 200


def _sources(state: AppState) -> dict[str, Source]:
    sources: dict[str, Source] = state.extra["sources"]
    return sources


@bp.get("/")
def list_sources() -> Response:
    return jsonify([s.describe() for s in _sources(state_of()).values()])


@bp.get("/<name>")
def read_source(name: str) -> Response:
    state = state_of()
    source = _sources(state).get(name)
    if source is None:
        raise NotFound(f"no source named {name!r}", sources=sorted(_sources(state)))
    params = source.check(request.args.to_dict(flat=True))
    result = read(state, source, params)
    return apply(render(source, result.value), request, result.entry, result.status,
                 state.clock())


def job_for(state: AppState, source: Source, params: dict[str, str]) -> Job:
    """The job that reads one source entry (also used by the admin's refresh)."""
    fetchers: Fetchers = state.extra["fetchers"]
    fetch = fetchers.fetch_http if source.kind == "http" else fetchers.fetch_python
    return Job(
        key=keying.source_key(source.name, state.generations.current(source.name),
                              params),
        fetch=lambda: fetch(source, params), windows=source.windows, source=source.name,
        params=params, storable=_storable_http if source.kind == "http" else _same,
    )


def _storable_http(value: Any) -> Any:
    return value if default_status_rule(value["status"]) else UNCACHEABLE


def _same(value: Any) -> Any:
    return value


def read(state: AppState, source: Source, params: dict[str, str]) -> Result:
    """Read a source's value through the cache (composites: each part, concurrently)."""
    if source.kind == "composite":
        return _read_composite(state, source, params)
    job = job_for(state, source, params)
    result = state.region.get_or_load(job)
    if source.kind == "http" and not _http_value(result.value):
        # A well-formed envelope whose fields are not an http answer (written by hand,
        # by another program, by an attacker): unusable, so treated as absent and
        # replaced by a fetch, never rendered (a 500) and never served again.
        state.region.invalidate(job.key)
        result = state.region.get_or_load(job)
    return result


def _http_value(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    status, ctype, body = value.get("status"), value.get("content_type"), value.get("body")
    return (type(status) is int and 100 <= status < 600 and isinstance(body, bytes)
            and isinstance(ctype, str) and not any(c in ctype for c in "\r\n\x00"))


def _read_composite(state: AppState, source: Source, params: dict[str, str]) -> Result:
    def read_part(part: Source) -> Result | Exception:
        mine = {k: v for k, v in params.items()
                if part.accepts_any or k in part.required or k in part.optional}
        try:
            return read(state, part, mine)
        except Exception as exc:  # noqa: BLE001 - re-raised in the request's greenlet
            return exc

    jobs = [gevent.spawn(read_part, part) for part in source.parts]
    gevent.joinall(jobs)
    results: list[Result] = []
    for job in jobs:
        if isinstance(job.value, Exception):
            raise job.value
        results.append(job.value)
    value = {p.name: _part_json(p, r.value) for p, r in zip(source.parts, results, strict=True)}
    statuses = {r.status for r in results}
    status = "MISS" if "MISS" in statuses else "STALE" if "STALE" in statuses else "HIT"
    entries = [r.entry for r in results if r.entry is not None]
    if len(entries) < len(results):
        return Result(value, None, status)  # a part was not cacheable: nothing to validate
    # Headers follow the part that goes stale first, with the composite's windows.
    first = min(entries, key=lambda e: e.timing.fresh_until)
    etag = hashlib.blake2b("".join(e.etag for e in entries).encode(),
                           digest_size=12).hexdigest()
    entry = Entry(value, Timing(first.timing.stored_at, source.windows), f'"{etag}"')
    return Result(value, entry, status)


def _part_json(part: Source, value: Any) -> Any:
    if part.kind != "http":
        return value
    body: bytes = value["body"]
    if "json" in value["content_type"]:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return body.decode("utf-8", "replace")


def render(source: Source, value: Any) -> Response:
    """The response body for a cached value: http passes the origin's answer through."""
    if source.kind == "http":
        return body_response(value["body"], value["status"], value["content_type"])
    return Response(orjson.dumps(value), mimetype="application/json")


@bp.post("/counters/<path:name>")
def bump_counter(name: str) -> Response:
    """An atomic counter shared by every worker and host, whose every number is unique.

    Refused with a 503 while the counter's memcached server does not answer (frozen,
    dead, cut off): its key never moves to another server, where a stand-in counter would
    start again and repeat numbers. A counter that memcached lost (restarted, flushed,
    evicted) starts again above every number it gave, at its server's clock in
    microseconds, so numbers are large and may jump forward; a timed-out increment may
    skip one. Why and how: :mod:`service.http.counters`.
    """
    if len(name) > MAX_COUNTER_NAME:
        raise BadRequest(f"counter names are at most {MAX_COUNTER_NAME} characters")
    try:
        # counters: a family of their own
        value = Counters(state_of().store.child("counter")).bump(name)
    except CacheUnavailable as exc:
        raise Unavailable(f"counters need memcached: {exc}") from exc
    return jsonify({"name": name, "value": value})


def init_app(app: Flask) -> None:
    """Build the sources of the app's settings (the app factory registers ``bp``)."""
    state = state_of(app)
    state.extra["sources"] = build_sources(state.settings.sources, state.settings.path)
    state.extra["fetchers"] = Fetchers(state.settings.refresh.fetch_timeout)
    # How a source's entry is read, for the layers that may not import this one (the
    # admin's refresh, the WSGI fast path): a hook on the state, not an import.
    state.source_job = job_for


# The WSGI fast path answers fresh hits of this route in front of Flask's dispatch.
register_source_view(read_source, render)
