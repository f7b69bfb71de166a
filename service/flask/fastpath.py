"""The fast path: fresh in-process hits answered in front of Flask's dispatch.

A hit that the worker's own tier (:class:`~service.tiers.LocalTier`) may answer costs
neither memcached nor decoding nor most of Flask's per-request machinery: this WSGI layer
wraps ``app.wsgi_app``, computes the key exactly as the front door would, and when the
entry is FRESH in the local tier and was confirmed less than ``l1_ttl`` ago it answers
with the same status, headers, body, 304/HEAD behaviour, metrics and ``X-Cache`` as the
slow path (``tests/integration/test_fastpath.py`` compares the two response by response).
The rendered answer (body, status, headers but the per-request ones) is kept with the
local entry, so a hit encodes nothing either.

Anything it is not sure about falls through to Flask, which then does what it always did:

* a method other than GET/HEAD, a URL Flask would not route to a cached front door, a
  ``before_request``/``after_request``/``url_value_preprocessor`` hook on the route (it
  would not run here), a composite source;
* for ``/v1/NAME``: parameters ``Source.check`` refuses (Flask answers the 400), or a
  source generation this worker has not read within ``l1_ttl``;
* for ``@swr.cached`` views: ``unless``, ``forced_update``, ``make_cache_key`` or a
  callable ``key_prefix`` (they need Flask's request), a class-based view, or a view
  wrapped in another decorator (the outer one, say a login check, must run);
* the entry is absent, older than ``l1_ttl`` here, or its answer is not a plain 2xx (no
  ``Location`` rewriting, no 204/206);
* the entry is STALE, or XFetch draws an early refresh, and nobody is refreshing the key
  yet (neither this worker's refresher, nor another worker whose lease it just found):
  Flask's path schedules the refresh (it makes its own draw, so a fast-path read can only
  make an early refresh a little later, never skip it). While the refresh runs, the slow
  path would only answer the same STALE (or HIT) copy and find the refresh already
  scheduled, so the fast path answers those reads itself: a refresh costs this worker's
  readers nothing.

What it skips, knowingly: Flask's ``request_started``/``request_finished`` signals and
``teardown_request`` hooks (nothing was opened), and moving the entry up the admin
ledger's LRU (it only serves keys the ledger already knows).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response
from werkzeug.exceptions import HTTPException
from werkzeug.http import parse_etags
from werkzeug.routing import RequestRedirect
from werkzeug.wrappers import Request

from ..errors import BadRequest
from ..observe import metrics
from ..readpath import keying
from ..readpath.tiers import LocalCopy
from .httpcache import accel_expires, cache_control, cache_status
from .responses import thaw
from .state import EXTENSION, AppState

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_ENTITY = frozenset({"allow", "content-encoding", "content-language", "content-length",
                     "content-md5", "content-range", "content-type", "last-modified"})


@dataclass(frozen=True)
class Rendered:
    """An answer without its per-request headers; shared by every hit of one entry."""

    status: str                      # "200 OK"
    headers: tuple[tuple[str, str], ...]
    body: bytes
    # Werkzeug appends a missing Content-Length after every other header, when it
    # produces the WSGI answer; this is that header (empty when the response had one).
    trailing: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ViewSpec:
    """What ``@swr.cached`` tells the fast path about a view (set by the decorator)."""

    wrapper: Callable[..., Any]      # the decorated view itself, to spot outer decorators
    options: Any                     # decorators.Options
    name: str                        # the function's cache name (``source_check``)


def rendered(response: Response) -> Rendered | None:
    """The reusable part of a front door's response, or ``None`` when it is not a plain
    2xx the fast path can replay byte for byte."""
    code = response.status_code
    if not 200 <= code < 300 or code in (204, 206) or response.is_streamed:
        return None
    headers = list(response.headers.items())
    if any(k.lower() in ("location", "content-location") for k, _ in headers):
        return None
    body = response.get_data()
    trailing: tuple[tuple[str, str], ...] = ()
    if not any(k.lower() == "content-length" for k, _ in headers):
        trailing = (("Content-Length", str(len(body))),)
    return Rendered(response.status, tuple(headers), body, trailing)


class _Target:
    """Where a (method, host, path) routes, as far as the fast path is concerned: a
    ``/v1`` source (``name``) or an ``@swr.cached`` view (``spec``). One per path."""

    __slots__ = ("view", "name", "spec", "vary")

    def __init__(self, view: Any, name: str | None, spec: ViewSpec | None) -> None:
        self.view = view
        self.name = name
        self.spec = spec
        # The WSGI environ keys of the ``vary`` headers, as EnvironHeaders looks them up.
        self.vary: tuple[tuple[str, str], ...] = ()
        if spec is not None:
            self.vary = tuple((h, _environ_key(h)) for h in spec.options.vary)


def _environ_key(header: str) -> str:
    key = header.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


class _Answer:
    """The headers of one local item's hits, for the second of age they were built in.
    The item is referenced weakly: an evicted entry's value is not kept alive here."""

    __slots__ = ("item", "age", "status", "headers")

    def __init__(self, item: LocalCopy, age: int, status: str,
                 headers: tuple[tuple[str, str], ...]) -> None:
        self.item = weakref.ref(item)
        self.age = age
        self.status = status
        self.headers = headers


_NOT_FAST = object()

_SOURCE_VIEWS: dict[Any, Callable[[Any, Any], Response]] = {}
"""View functions that read a ``/v1`` source, with how each renders an entry's value:
registered by the service's views (:func:`register_source_view`), which this layer may
not import."""


def register_source_view(view: Any, render: Callable[[Any, Any], Response]) -> None:
    """Let the fast path answer ``view`` (a source's route) with ``render(source, value)``."""
    _SOURCE_VIEWS[view] = render
"""A memo value: Flask answers this one (no cached front door, a hook, a 400...)."""


def _remember(memo: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    # Bounded by starting afresh: a full memo is a sign of many distinct URLs, where
    # recency says little; refilling costs one slow computation per URL.
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value


class FastPath:
    """WSGI middleware over ``app.wsgi_app``; see the module docstring.

    Per-hit work is memoized by what it is a pure function of, each memo bounded by
    ``MEMO_LIMIT`` entries: the routing decision by (method, host, script root, path,
    scheme), the key by the raw query string (and the raw ``vary`` header values, and the
    source's generation), and the response headers by the local item and its whole-second
    age.

    :param enabled: ``False`` sends every request to Flask (tests compare both paths).
    """

    MEMO_LIMIT = 4096

    def __init__(self, app: Flask, wsgi_app: WSGIApp) -> None:
        self.app = app
        self.wsgi_app = wsgi_app
        self.enabled = True
        self._routes: dict[tuple[str, ...], Any] = {}
        self._keys: dict[tuple[Any, ...], Any] = {}
        self._answers: dict[str, _Answer] = {}
        self._counters: dict[tuple[str, str], tuple[Any, Any]] = {}

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        if self.enabled and environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            answer = self.answer(environ)
            if answer is not None:
                status, headers, body = answer
                start_response(status, headers)
                return [body]
        return self.wsgi_app(environ, start_response)

    # -- the decision --------------------------------------------------------------------

    def answer(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes] | None:
        """The whole answer for a fresh local hit, or ``None`` to let Flask answer."""
        state: AppState | None = self.app.extensions.get(EXTENSION)
        if state is None:
            return None
        target = self._target(environ)
        if target is None:
            return None
        if target.spec is None:
            found = self._source(state, target, environ)
        else:
            found = self._view(target, environ)
        if found is None:
            return None
        key, source, render = found
        return self._serve(state, key, source, render, environ)

    def _target(self, environ: dict[str, Any]) -> _Target | None:
        """The route's target, memoized once Flask has handled a request (before that,
        routes and hooks may still be added)."""
        route = (environ["REQUEST_METHOD"], environ.get("HTTP_HOST", ""),
                 environ.get("SERVER_NAME", ""), environ.get("SERVER_PORT", ""),
                 environ.get("SCRIPT_NAME", ""), environ.get("PATH_INFO", ""),
                 environ.get("wsgi.url_scheme", ""))
        target = self._routes.get(route)
        if target is None:
            target = self._route(environ) or _NOT_FAST
            if self.app._got_first_request:
                _remember(self._routes, route, target, self.MEMO_LIMIT)
        return target if isinstance(target, _Target) else None

    def _route(self, environ: dict[str, Any]) -> _Target | None:
        try:
            endpoint, args = self.app.create_url_adapter(Request(environ)).match()  # type: ignore
        except (HTTPException, RequestRedirect):
            return None
        if self._hooked(endpoint):
            return None
        view = self.app.view_functions.get(endpoint)
        if view is None:
            return None
        if view in _SOURCE_VIEWS:
            return _Target(view, args.get("name"), None)
        spec: ViewSpec | None = getattr(view, "swr_view", None)
        if spec is None or spec.wrapper is not view:
            return None
        opts = spec.options
        if (opts.unless is not None or opts.forced_update is not None
                or opts.make_cache_key is not None or not isinstance(opts.key_prefix, str)):
            return None
        return _Target(view, None, spec)

    def _hooked(self, endpoint: str) -> bool:
        """Whether a hook would run for this endpoint (it must: let Flask answer)."""
        names: list[str | None] = [None]
        parts = endpoint.split(".")[:-1]
        names += [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        app = self.app
        return any(app.before_request_funcs.get(n) or app.after_request_funcs.get(n)
                   or app.url_value_preprocessors.get(n) for n in names)

    def _source(self, state: AppState, target: _Target, environ: dict[str, Any]
                ) -> tuple[str, str, Callable[[Any], Response]] | None:
        source = state.extra.get("sources", {}).get(target.name)
        if source is None or source.kind == "composite":
            return None
        # The generation as the slow path would use it, without its memcached read.
        cached = state.generations.remembered(source.name)
        if cached is None or state.monotonic() - cached[1] >= state.tiers.l1_ttl:
            return None
        memo = (source.name, cached[0], environ.get("QUERY_STRING", ""))
        known = self._keys.get(memo)
        # The source object is kept with the key: settings reloaded make a new one.
        if known is None or known[0] is not source:
            render = _SOURCE_VIEWS[target.view]
            try:
                params = source.check(Request(environ).args.to_dict(flat=True))
                key: Any = keying.source_key(source.name, cached[0], params)
            except BadRequest:
                key = _NOT_FAST
            known = (source, key, lambda value: render(source, value))
            _remember(self._keys, memo, known, self.MEMO_LIMIT)
        if known[1] is _NOT_FAST:
            return None
        return known[1], source.name, known[2]

    def _view(self, target: _Target, environ: dict[str, Any]
              ) -> tuple[str, str, Callable[[Any], Response]] | None:
        spec = target.spec
        assert spec is not None
        opts = spec.options
        memo = (target, environ.get("QUERY_STRING", "") if opts.query_string else None,
                *(environ.get(k) for _, k in target.vary))
        key = self._keys.get(memo)
        if key is None:
            request = Request(environ)
            vary = {h: request.headers[h] for h in opts.vary if h in request.headers}
            query = request.args.items(multi=True) if opts.query_string else None
            key = keying.view_key(opts.key_prefix, request.path, query, vary)
            if opts.source_check:
                key += "@" + spec.name
            _remember(self._keys, memo, key, self.MEMO_LIMIT)
        return key, target.view.__name__, thaw

    def _serve(self, state: AppState, key: str, source: str,
               render: Callable[[Any], Response], environ: dict[str, Any]
               ) -> tuple[str, list[tuple[str, str]], bytes] | None:
        hit = state.region.local_hit(key)
        if hit is None:
            return None
        item, status, now = hit
        entry = item.entry
        if item.rendered is None:
            try:
                made = rendered(render(item.materialize().value))
            except ValueError:
                made = None
            # False: this entry's answer cannot be replayed; do not try again.
            state.tiers.local.attach(key, item, made or False,
                                     len(made.body) + 200 if made else 0)
        answer = item.rendered
        if not isinstance(answer, Rendered):
            return None
        counters = self._counters.get((source, status))
        if counters is None:
            counters = self._counters[(source, status)] = (
                metrics.tier_hits_total.labels("l1"),
                metrics.requests_total.labels(source, status.lower()))
        counters[0].inc()
        counters[1].inc()
        age = math.floor(entry.timing.age(now))
        built = self._answers.get(key)
        if (built is None or built.item() is not item or built.age != age
                or built.status != status):
            built = _Answer(item, age, status, (
                *answer.headers, ("X-Cache", status),
                ("Cache-Status", cache_status(status, entry, age)), ("Age", str(age)),
                ("Cache-Control", cache_control(entry)),
                ("X-Accel-Expires", accel_expires(entry, age)), ("ETag", entry.etag),
                *answer.trailing))
            _remember(self._answers, key, built, self.MEMO_LIMIT)
        if_none_match = environ.get("HTTP_IF_NONE_MATCH")
        if if_none_match and parse_etags(if_none_match).contains_weak(entry.etag.strip('"')):
            # httpcache.apply's 304, as Werkzeug sends it: no body, no entity headers.
            return ("304 NOT MODIFIED",
                    [(k, v) for k, v in built.headers if k.lower() not in _ENTITY], b"")
        body = b"" if environ["REQUEST_METHOD"] == "HEAD" else answer.body
        return answer.status, list(built.headers), body


def init_app(app: Flask) -> None:
    """Put the fast path in front of ``app``'s dispatch (once)."""
    if not isinstance(app.wsgi_app, FastPath):
        app.wsgi_app = FastPath(app, app.wsgi_app)  # type: ignore[method-assign]
