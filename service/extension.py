"""The library API: stale-while-revalidate for any Flask view or plain function.

For a Flask-Caching user, adoption is a swap of one decorator::

    from flask import Flask
    from service import SWR

    app = Flask(__name__)
    swr = SWR(app)                      # reads settings.toml (or SERVICE_SETTINGS)

    @app.get("/report")
    @swr.cached(max_age=60, stale_while_revalidate=600, stale_if_error=3600)
    def report():
        return build_expensive_report()  # runs once per window, fleet-wide

    @swr.periodic("exchange-rates", every=3600)
    def exchange_rates():
        return fetch_rates()             # recomputed hourly by one worker of the fleet

    @app.get("/rates")
    def rates():
        return swr.value("exchange-rates")   # never waits, except on a cold cache

``swr.cache`` is the Flask-Caching object over the same memcached pool, so existing
``cache.get/set`` and ``@cache.cached`` code keeps working next to ``@swr.cached``.
Nothing connects or spawns at import or in ``init_app``: connections are made on first
use in the worker, and the refresher starts after fork (gunicorn's ``post_worker_init``,
or lazily on the first background refresh).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from flask import Flask, Response, current_app, g, has_request_context, request
from flask_caching import Cache

from . import clients, codec, httpcache
from .backend import flask_caching_config
from .config import Settings, load_settings
from .freshness import Windows
from .keys import digest
from .lease import Leases
from .refresher import Refresher
from .swr import EXTENSION, Result, SWRCache
from .tiers import LocalTier, TwoTier

P = ParamSpec("P")
R = TypeVar("R")
SETTINGS = "service.settings"


class SWR:
    """Flask extension; ``SWR(app)`` or ``swr = SWR()`` then ``swr.init_app(app)``."""

    def __init__(self, app: Flask | None = None, settings: Settings | None = None) -> None:
        self.cache = Cache()
        self._periodic: list[tuple[str, float, Callable[[], Any], Windows | None]] = []
        if app is not None:
            self.init_app(app, settings)

    def init_app(self, app: Flask, settings: Settings | None = None) -> None:
        """Wire the pool, Flask-Caching, both tiers, leases and the refresher into ``app``.

        :param settings: by default the app's (from :func:`service.create_app`) or the
            file named by ``SERVICE_SETTINGS``.
        """
        settings = settings or app.extensions.get(SETTINGS) or load_settings()
        app.extensions[SETTINGS] = settings
        if clients.EXTENSION not in app.extensions:
            clients.init_app(app, settings.cache)
        self.cache.init_app(app, config=flask_caching_config(settings.cache))
        # The memcached tier is the Flask-Caching backend's store: one pool, one codec.
        store = app.extensions["cache"][self.cache].store
        tiers = TwoTier(store, LocalTier(settings.cache.l1_max_entries),
                        settings.cache.l1_ttl, time.monotonic)
        refresher = Refresher(app, settings.refresh.concurrency, settings.refresh.backoff_max)
        cache = SWRCache(app, tiers, Leases(store, settings.refresh.lock_lease), refresher,
                         settings.refresh)
        app.extensions[EXTENSION] = cache
        app.after_request(_apply_cache_headers)
        for name, every, fn, windows in self._periodic:
            cache.periodic(name, every, fn, windows)

    @staticmethod
    def _swr() -> SWRCache:
        swr: SWRCache = current_app.extensions[EXTENSION]
        return swr

    def get_or_fetch(self, key: str, fetch: Callable[[], Any], max_age: float,
                     stale_while_revalidate: float = 0.0, stale_if_error: float = 0.0,
                     source: str = "-") -> Result:
        """The general form behind the decorators; see :meth:`SWRCache.get_or_fetch`."""
        windows = Windows(max_age, stale_while_revalidate, stale_if_error)
        return self._swr().get_or_fetch(key, fetch, windows, source)

    def cached(self, max_age: float, stale_while_revalidate: float = 0.0,
               stale_if_error: float = 0.0, key: str | None = None
               ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Cache a view or function with stale-while-revalidate semantics.

        In a request, the key is the endpoint, path and sorted query string, and the
        background refresh re-runs the view in a request context for the same URL.
        Outside requests, the key is the function and its (JSON-encodable) arguments.
        Responses get ``X-Cache``, ``Age``, ``Cache-Control`` and ``ETag`` headers.
        """
        windows = Windows(max_age, stale_while_revalidate, stale_if_error)

        def decorator(f: Callable[P, R]) -> Callable[P, R]:
            name = f"{f.__module__}.{f.__qualname__}"

            @functools.wraps(f)
            def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
                app = current_app._get_current_object()  # type: ignore[attr-defined]
                if has_request_context():
                    path, query = request.path, request.query_string.decode("latin-1")
                    args_key = f"{path}?{_sorted_query()}"

                    def context() -> Any:
                        return app.test_request_context(path, query_string=query)
                else:
                    args_key = digest(codec.encode([list(args), kwargs]))
                    context = app.app_context
                cache_key = key or f"fn:{name}:{args_key}"
                result = self._swr().get_or_fetch(
                    cache_key, lambda: f(*args, **kwargs), windows, f.__name__, context)
                if has_request_context():
                    g.swr_result = result
                value: R = result.value
                return value

            return wrapper

        return decorator

    def periodic(self, name: str, every: float, stale_while_revalidate: float | None = None,
                 stale_if_error: float = 86400.0) -> Callable[[Callable[[], R]], Callable[[], R]]:
        """Register ``fn`` to be recomputed every ``every`` seconds by one worker of the
        fleet (the seeds' deque refreshed by APScheduler, done right). Read it with
        :meth:`value`. Registration only records it: the loop starts with the refresher,
        in the worker."""
        windows = Windows(every, every * 2 if stale_while_revalidate is None
                          else stale_while_revalidate, stale_if_error)

        def decorator(fn: Callable[[], R]) -> Callable[[], R]:
            self._periodic.append((name, every, fn, windows))
            return fn

        return decorator

    def value(self, name: str) -> Any:
        """The latest value of a periodic function (waits only on a cold cache)."""
        for registered, _every, fn, windows in self._periodic:
            if registered == name:
                assert windows is not None
                return self._swr().get_or_fetch(name, fn, windows, name).value
        raise KeyError(f"no periodic function named {name!r}")

    def invalidate(self, key: str) -> None:
        self._swr().invalidate(key)

    def start(self, app: Flask) -> None:
        """Start the refresher in this worker (gunicorn's ``post_worker_init``)."""
        app.extensions[EXTENSION].refresher.start()

    def stop(self, app: Flask, timeout: float = 10.0) -> int:
        """Drain the refresher (gunicorn's ``worker_exit``)."""
        refresher: Refresher = app.extensions[EXTENSION].refresher
        return refresher.stop(timeout)


def _sorted_query() -> str:
    return "&".join(f"{k}={v}" for k, v in sorted(request.args.items(multi=True)))


def _apply_cache_headers(response: Response) -> Response:
    result: Result | None = g.pop("swr_result", None)
    if result is None:
        return response
    now = current_app.extensions[EXTENSION].clock()
    return httpcache.apply(response, request, result.entry, result.status, now)
