"""``cached`` and ``memoize``: Flask-Caching's decorators, with stale-while-revalidate.

One implementation serves ``@swr.cached`` / ``@swr.memoize`` (and the ``Cache`` subclass
that gives ``@cache.cached`` / ``@cache.memoize`` the same behaviour). Both build a
:class:`~service.loader.Job` and read it through the app's
:class:`~service.region.Region`, so they share the lease, the fenced write, the
refresher, the metrics and the header path with ``/v1``.

Views and functions are told apart at call time. ``@cached`` on the view Flask is
dispatching keys the entry by the request path and its canonical, escaped query string
(plus the ``vary`` headers) and stores the *response* — only when it is cacheable (see
:mod:`service.responses`). On any other function (a helper called from a view, a task
outside requests), ``@cached`` keys by the function and its arguments, like ``@memoize``.

Where the view runs:

* the caller's own MISS runs it in the caller's real request (its headers, cookies,
  session and ``g``), in a greenlet of its own with a copy of the request's context;
* a background refresh rebuilds a GET request for the same URL: path, query string,
  ``Host`` and the ``vary`` headers, and nothing else (no cookies, no session, no
  ``Authorization``; ``before_request`` hooks do not run, the view function is called
  directly). A view whose answer depends on more must name those headers in ``vary``
  or not be cached.

``abort()`` and exceptions propagate exactly as in plain Flask: nothing is stored, and
other readers of the key run the view themselves.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import (
    Flask,
    Response,
    current_app,
    has_app_context,
    has_request_context,
    request,
)

from ..config import ConfigError
from ..readpath import keying
from ..readpath.fetching import Runner
from ..readpath.freshness import Windows
from ..readpath.generations import function_family
from ..readpath.loader import UNCACHEABLE, Job
from ..readpath.region import Result
from . import httpcache
from .fastpath import ViewSpec
from .responses import ResponseFilter, cacheable, freeze, thaw
from .state import AppState

StateGetter = Callable[[], AppState]


@dataclass(frozen=True)
class Options:
    """Flask-Caching's decorator parameters, plus the two stale windows.

    ``max_age`` (or Flask-Caching's ``timeout``) of ``None`` means the app's default
    (``CACHE_DEFAULT_TIMEOUT``).
    """

    max_age: float | None = None
    stale_while_revalidate: float | None = None
    stale_if_error: float | None = None
    key_prefix: str | Callable[[], str] = "view/%s"
    query_string: bool = True
    vary: tuple[str, ...] = ()
    unless: Callable[..., bool] | None = None
    forced_update: Callable[[], bool] | None = None
    response_filter: ResponseFilter | None = None
    make_cache_key: Callable[..., str] | None = None
    make_name: Callable[[str], str] | None = None
    source_check: bool = False
    args_to_ignore: tuple[str, ...] = ()
    is_stale: Callable[[Any], bool] | None = None
    hit_indication: bool = False

    def __post_init__(self) -> None:
        # Refused where it is declared (at import), not at the first request: the message
        # names the parameter and what it takes.
        for name in ("max_age", "stale_while_revalidate", "stale_if_error"):
            value = getattr(self, name)
            if value is None:
                continue
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value < 0):
                raise ConfigError(
                    f"@cached/@memoize: {name}={value!r}: expected a number of seconds >= 0 "
                    f"(or None for the app's default)")

    def windows(self, state: AppState) -> Windows:
        defaults = state.settings.cache
        max_age = self.max_age if self.max_age is not None else defaults.default_timeout
        swr = (self.stale_while_revalidate if self.stale_while_revalidate is not None
               else defaults.stale_while_revalidate)
        sie = (self.stale_if_error if self.stale_if_error is not None
               else defaults.stale_if_error)
        return Windows(float(max_age), float(swr), float(sie))


def decorate(f: Callable[..., Any], opts: Options, state: StateGetter,
             function_only: bool) -> Callable[..., Any]:
    """Wrap ``f``; ``function_only`` for ``memoize`` (always keyed by arguments)."""
    name = keying.function_name(f, opts.source_check)
    if opts.make_name is not None:
        name = opts.make_name(name)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if opts.unless is not None and _bypass(opts.unless, f, args, kwargs):
            return f(*args, **kwargs)
        st = state()
        if (not function_only and has_request_context()
                and _is_dispatched_view(wrapper)):
            if request.method not in ("GET", "HEAD"):
                return f(*args, **kwargs)  # only safe methods are cached
            return _serve_view(st, f, args, kwargs, opts, name)
        return _serve_call(st, f, args, kwargs, opts, name, function_only).value

    wrapper.uncached = f  # type: ignore[attr-defined]
    if not function_only:  # what service.fastpath needs to answer its fresh local hits
        wrapper.swr_view = ViewSpec(wrapper, opts, name)  # type: ignore[attr-defined]

    def make_call_key(*a: Any, **kw: Any) -> str:
        return call_key(state(), f, opts, name, a, kw, function_only)

    wrapper.make_call_key = make_call_key  # type: ignore[attr-defined]
    if opts.make_cache_key is None and (function_only or not _static(opts.key_prefix)):
        # Keys with a generation: every call can be forgotten at once (delete_memoized).
        family = function_family(name)
        wrapper.forget_calls = lambda: state().generations.bump(family)  # type: ignore
    return wrapper


def call_key(st: AppState, f: Callable[..., Any], opts: Options, name: str,
             args: Iterable[Any], kwargs: Mapping[str, Any], function_only: bool) -> str:
    """The key of one call of a decorated function (also used to invalidate it)."""
    if opts.make_cache_key is not None:
        return str(opts.make_cache_key(*args, **kwargs))
    if not function_only and _static(opts.key_prefix):
        # Flask-Caching's @cached(key_prefix="all_comments") on a helper: that very key,
        # so cache.delete("all_comments") invalidates it.
        return opts.key_prefix() if callable(opts.key_prefix) else opts.key_prefix
    generation = st.generations.current(function_family(name))
    return keying.call_key(name, generation, f, list(args), kwargs, opts.args_to_ignore)


def delete_memoized(st: AppState, f: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> None:
    """Flask-Caching's ``delete_memoized``: forget the call of ``f`` with these arguments,
    or, given none, every call of ``f`` (its generation is bumped: every worker and host
    computes anew, the others within ``l1_ttl``).

    A bound method (``obj.method``) stands for the function with ``obj`` as its first
    argument. Without arguments it forgets the calls of every instance, not only ``obj``'s
    (Flask-Caching forgets ``obj``'s only): more than asked, never less.

    :raises TypeError: ``f`` is not decorated with ``memoize`` or ``cached``.
    :raises CacheUnavailable: memcached could not be asked.
    """
    target: Any = f
    if inspect.ismethod(f):
        target = f.__func__
        if args or kwargs:
            args = (f.__self__, *args)
    make_call_key = getattr(target, "make_call_key", None)
    if make_call_key is None:
        raise TypeError(f"{f!r} is not decorated with memoize or cached")
    forget_calls = getattr(target, "forget_calls", None)
    if not args and not kwargs and forget_calls is not None:
        forget_calls()
    else:
        st.region.invalidate(make_call_key(*args, **kwargs))


def _serve_call(st: AppState, f: Callable[..., Any], args: tuple[Any, ...],
                kwargs: dict[str, Any], opts: Options, name: str, function_only: bool
                ) -> Result:
    key = call_key(st, f, opts, name, args, kwargs, function_only)
    job = Job(
        key=key,
        fetch=functools.partial(f, *args, **kwargs),
        windows=opts.windows(st),
        source=f.__name__,
        run=_caller_context() if has_app_context() else None,
        wrap_errors=False,
    )
    result = st.region.get_or_load(job, force=_forced(opts))
    if result.status != "MISS" and opts.is_stale is not None and opts.is_stale(result.value):
        result = st.region.get_or_load(job, force=True)  # Flask-Caching's is_stale
    return result


def _serve_view(st: AppState, f: Callable[..., Any], args: tuple[Any, ...],
                kwargs: dict[str, Any], opts: Options, name: str) -> Response:
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    vary = {h: request.headers[h] for h in opts.vary if h in request.headers}
    if opts.make_cache_key is not None:
        key = str(opts.make_cache_key(*args, **kwargs))
    else:
        prefix = opts.key_prefix() if callable(opts.key_prefix) else opts.key_prefix
        query = request.args.items(multi=True) if opts.query_string else None
        key = keying.view_key(prefix, request.path, query, vary)
        if opts.source_check:
            key += "@" + name

    def fetch() -> Response:
        return current_app.make_response(f(*args, **kwargs))

    def storable(response: Response) -> Any:
        return freeze(response) if cacheable(response, opts.response_filter) else UNCACHEABLE

    job = Job(
        key=key, fetch=fetch, windows=opts.windows(st), source=f.__name__,
        params=request.args.to_dict(flat=True),
        run=_caller_context(),
        background=_rebuilt_request(app, request.path, request.query_string,
                                    {"Host": request.host, **vary}),
        storable=storable, wrap_errors=False,
    )
    result = st.region.get_or_load(job, force=_forced(opts))
    response = thaw(result.value) if result.entry is not None else result.value
    if result.status != "MISS" and opts.is_stale is not None and opts.is_stale(response):
        result = st.region.get_or_load(job, force=True)  # Flask-Caching's is_stale
        response = thaw(result.value) if result.entry is not None else result.value
    if opts.hit_indication:  # Flask-Caching's response_hit_indication
        response.headers["hit_cache"] = str(result.status != "MISS")
    return httpcache.apply(response, request, result.entry, result.status, st.clock())


def _caller_context() -> Runner:
    """Run the fetch with a copy of the caller's context: its request, session and ``g``
    (the fetch runs in a greenlet of its own, which starts with an empty context)."""
    ctx = contextvars.copy_context()
    return lambda fetch: ctx.run(fetch)


def _rebuilt_request(app: Flask, path: str, query: bytes, headers: dict[str, str]) -> Runner:
    def run(fetch: Callable[[], Any]) -> Any:
        with app.test_request_context(path, method="GET", query_string=query.decode("latin-1"),
                                      headers=headers):
            return fetch()

    return run


def _static(prefix: str | Callable[[], str]) -> bool:
    return callable(prefix) or (prefix != "view/%s" and "%s" not in prefix)


def _forced(opts: Options) -> bool:
    return bool(opts.forced_update is not None and opts.forced_update())


def _bypass(unless: Callable[..., bool], f: Callable[..., Any], args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> bool:
    """Flask-Caching calls ``unless()``, or ``unless(f, *args, **kwargs)`` when it takes
    arguments."""
    try:
        takes_args = bool(inspect.signature(unless).parameters)
    except (TypeError, ValueError):
        takes_args = False
    return bool(unless(f, *args, **kwargs) if takes_args else unless())


def _is_dispatched_view(wrapper: Callable[..., Any]) -> bool:
    """Whether ``wrapper`` is (part of) the view Flask is dispatching right now."""
    endpoint = request.endpoint
    view: Any = current_app.view_functions.get(endpoint) if endpoint else None
    if view is not None and getattr(view, "view_class", None) is not None:
        return any(member is wrapper for member in vars(view.view_class).values())
    while view is not None:
        if view is wrapper:
            return True
        view = getattr(view, "__wrapped__", None)
    return False
