"""The ``/v1`` routes: list the sources, read one, bump a counter. Thin on purpose.

Reading ``GET /v1/NAME?params`` validates the parameters against the source, reads its
entry through :class:`~service.swr.SWRCache` (fresh, stale-while-revalidate,
stale-if-error), and answers with ``X-Cache``, ``Age``, ``Cache-Control`` and ``ETag``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import gevent
import orjson
from flask import Blueprint, Flask, Response, current_app, jsonify, request

from .clients import release_connection
from .entry import Entry
from .errors import BadRequest, CacheUnavailable, NotFound, Unavailable
from .freshness import Timing
from .httpcache import apply
from .sources import Fetchers, Source, build_sources
from .swr import EXTENSION, Result, SWRCache

bp = Blueprint("v1", __name__, url_prefix="/v1")
SOURCES = "service.sources"
FETCHERS = "service.fetchers"
GENERATIONS = "service.generations"
MAX_COUNTER_NAME = 200


def _swr() -> SWRCache:
    cache: SWRCache = current_app.extensions[EXTENSION]
    return cache


def _sources() -> dict[str, Source]:
    sources: dict[str, Source] = current_app.extensions[SOURCES]
    return sources


@bp.get("/")
def list_sources() -> Response:
    return jsonify([s.describe() for s in _sources().values()])


@bp.get("/<name>")
def read_source(name: str) -> Response:
    source = _sources().get(name)
    if source is None:
        raise NotFound(f"no source named {name!r}", sources=sorted(_sources()))
    params = source.check(request.args.to_dict(flat=True))
    result = read(source, params)
    return apply(render(source, result.value), request, result.entry, result.status,
                 _swr().clock())


def cache_key(source: Source, params: dict[str, str]) -> str:
    """The entry's key: source, its generation (bumped to invalidate all its entries at
    once, see :func:`bump_generation`) and the sorted parameters."""
    generation = _generation(source.name)
    return f"src:{source.name}:{generation}:" + orjson.dumps(sorted(params.items())).decode()


def _generation_key(name: str) -> str:
    return f"gen\x00{name}"


def _generation(name: str) -> int:
    # Read from memcached at most once per l1_ttl per worker: invalidating a whole source
    # reaches every worker within l1_ttl, like any other change.
    cache: dict[str, tuple[int, float]] = current_app.extensions[GENERATIONS]
    swr = _swr()
    now = swr.tiers.monotonic()
    cached = cache.get(name)
    if cached is not None and now - cached[1] < swr.tiers.l1_ttl:
        return cached[0]
    try:
        value = swr.tiers.store.get_counter(_generation_key(name)) or 0
    except CacheUnavailable:
        value = cached[0] if cached is not None else 0
    cache[name] = (value, now)
    return value


def bump_generation(name: str) -> int:
    """Invalidate every entry of a source, in every worker and host (within l1_ttl).

    :raises CacheUnavailable: memcached could not be asked.
    """
    store = _swr().tiers.store
    key = _generation_key(name)
    store.add_counter(key, 0)
    value = store.incr(key) or 0
    current_app.extensions[GENERATIONS].pop(name, None)
    return value


def read(source: Source, params: dict[str, str]) -> Result:
    """Read a source's value through the cache (composites: each part, concurrently)."""
    if source.kind == "composite":
        return _read_composite(source, params)
    fetchers: Fetchers = current_app.extensions[FETCHERS]
    fetch = fetchers.fetch_http if source.kind == "http" else fetchers.fetch_python
    return _swr().get_or_fetch(cache_key(source, params), lambda: fetch(source, params),
                               source.windows, source.name, params=params)


def _read_composite(source: Source, params: dict[str, str]) -> Result:
    app = current_app._get_current_object()  # type: ignore[attr-defined]

    def read_part(part: Source) -> Result | Exception:
        # Each part in its own greenlet and app context (so its own memcached
        # connection): a connection on g is never shared between greenlets.
        mine = {k: v for k, v in params.items()
                if part.accepts_any or k in part.required or k in part.optional}
        try:
            with app.app_context():
                return read(part, mine)
        except Exception as exc:  # noqa: BLE001 - re-raised in the request's greenlet
            return exc

    jobs = [gevent.spawn(read_part, part) for part in source.parts]
    release_connection()  # do not hold a pooled connection while the parts run
    gevent.joinall(jobs)
    results: list[Result] = []
    for job in jobs:
        if isinstance(job.value, Exception):
            raise job.value
        results.append(job.value)
    value = {p.name: _part_json(p, r.value) for p, r in zip(source.parts, results, strict=True)}
    statuses = {r.status for r in results}
    status = "MISS" if "MISS" in statuses else "STALE" if "STALE" in statuses else "HIT"
    # Headers follow the part that goes stale first, bounded by the composite's windows.
    first = min(results, key=lambda r: r.entry.timing.fresh_until)
    stored_at = first.entry.timing.stored_at
    etag = hashlib.blake2b("".join(r.entry.etag for r in results).encode(),
                           digest_size=12).hexdigest()
    entry = Entry(value, Timing(stored_at, source.windows), f'"{etag}"')
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
        return Response(value["body"], status=value["status"],
                        content_type=value["content_type"])
    return Response(orjson.dumps(value), mimetype="application/json")


@bp.post("/counters/<path:name>")
def bump_counter(name: str) -> Response:
    """An atomic counter shared by every worker and host (memcached ``incr``).

    memcached counters are volatile: a restart, an eviction or a server change resets
    them. Use them for rate limits and statistics, not for money.
    """
    if len(name) > MAX_COUNTER_NAME:
        raise BadRequest(f"counter names are at most {MAX_COUNTER_NAME} characters")
    store = _swr().tiers.store
    key = f"counter\x00{name}"
    try:
        value = store.incr(key)
        if value is None:
            # Create it at 0 with add (only one creator wins), then everyone increments.
            store.add_counter(key, 0)
            value = store.incr(key)
    except CacheUnavailable as exc:
        raise Unavailable(f"counters need memcached: {exc}") from exc
    if value is None:
        raise Unavailable("the counter vanished while it was created (memcached evicting?)")
    return jsonify({"name": name, "value": value})


def init_app(app: Flask) -> None:
    settings = app.extensions["service.settings"]
    app.extensions[SOURCES] = build_sources(settings.sources, settings.path)
    app.extensions[FETCHERS] = Fetchers(settings.refresh.fetch_timeout)
    app.extensions[GENERATIONS] = {}
    app.register_blueprint(bp)
