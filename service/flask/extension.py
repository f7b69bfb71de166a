"""The library API: stale-while-revalidate for any Flask view or plain function.

For a Flask-Caching user, adoption is a swap of one decorator::

    from flask import Flask
    from service import SWR

    app = Flask(__name__)
    app.config["CACHE_MEMCACHED_SERVERS"] = ["127.0.0.1:11211"]
    swr = SWR(app)

    @app.get("/report")
    @swr.cached(max_age=60, stale_while_revalidate=600, stale_if_error=3600)
    def report():
        return build_expensive_report()  # runs once per window, fleet-wide

    @swr.memoize(max_age=300)
    def user_name(user_id):
        return lookup(user_id)           # keyed by its arguments

    @swr.periodic("exchange-rates", every=3600)
    def exchange_rates():
        return fetch_rates()             # recomputed hourly by one worker of the fleet

Settings come from the defaults, then Flask's config (Flask-Caching's keys:
``CACHE_MEMCACHED_SERVERS``, ``CACHE_KEY_PREFIX``, ``CACHE_DEFAULT_TIMEOUT``,
``CACHE_OPTIONS``, plus ``CACHE_STALE_WHILE_REVALIDATE`` and ``CACHE_STALE_IF_ERROR``),
then the file named by ``SERVICE_SETTINGS`` if that is set. ``swr.cache`` is a
Flask-Caching object over the same memcached pool (its own namespace), so existing
``cache.get/set`` and ``@cache.cached`` code keeps working. Nothing connects or spawns in
``init_app``: sockets open on first use in the worker, and the refresher starts after
fork (``service.worker.post_worker_init`` in gunicorn, or lazily on first use).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, current_app, has_app_context
from flask_caching import Cache

from ..config import Settings
from ..errors import NotSetUp
from ..memcache import clients
from ..readpath.freshness import Windows
from ..readpath.loader import Job
from ..readpath.region import Result
from . import cli, fastpath, health
from .backend import flask_caching_config
from .decorators import Options, decorate, delete_memoized
from .flaskconfig import library_settings
from .state import EXTENSION, AppState, build

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")


class SWR:
    """Flask extension; ``SWR(app)`` or ``swr = SWR()`` then ``swr.init_app(app)``."""

    def __init__(self, app: Flask | None = None, settings: Settings | None = None, *,
                 endpoints: bool | None = None) -> None:
        self.cache = Cache()
        self.app: Flask | None = None
        self._periodic: dict[str, tuple[Callable[[], Any], float, Windows]] = {}
        if app is not None:
            self.init_app(app, settings, endpoints=endpoints)

    def init_app(self, app: Flask, settings: Settings | None = None, *,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 endpoints: bool | None = None) -> None:
        """Build the app's state (pool, tiers, leases, refresher) and Flask-Caching, and
        add ``flask swr`` to the app's command line.

        :param settings: by default :func:`service.flaskconfig.library_settings` of the
            app's config (defaults, Flask config, then ``SERVICE_SETTINGS``).
        :param clock: wall clock for every freshness decision (a fake one in tests);
            ``monotonic`` likewise for ``l1_ttl``, leases and back-off.
        :param endpoints: mount ``/healthz``, ``/readyz`` and ``/metrics`` on the app
            (:mod:`service.flask.health`); by default the app's ``SWR_ENDPOINTS`` config
            (off: the paths are the app's to give).
        """
        settings = settings or library_settings(app.config)
        state = build(app, settings, clock, monotonic)
        # flask.g checkout for the app's own code (clients.get_connection), same pool.
        clients.init_app(app, settings.cache)
        self.cache.init_app(app, config=flask_caching_config(settings.cache))
        fastpath.init_app(app)  # fresh local hits answered before Flask's dispatch
        cli.init_app(app)
        if endpoints if endpoints is not None else _flag(app.config.get("SWR_ENDPOINTS")):
            health.init_app(app)
        self.app = app
        for name, (fn, every, windows) in self._periodic.items():
            state.region.periodic(Job(name, fn, windows, source=name), every)

    def state(self) -> AppState:
        """The state of the current app, or of the app this extension was set up with.

        :raises NotSetUp: ``init_app`` was never called for that app (the message says
            which call is missing).
        """
        return self._state_for(None)

    def _state_for(self, user: tuple[str, Callable[..., Any]] | None) -> AppState:
        """:meth:`state`, for the decorator ``user[0]`` of function ``user[1]`` (named in
        the error when the app was never set up)."""
        app = (current_app._get_current_object()  # type: ignore[attr-defined]
               if has_app_context() else self.app)
        st: AppState | None = app.extensions.get(EXTENSION) if app is not None else None
        if st is not None:
            return st
        what = "this SWR object"
        if user is not None:
            fn = user[1]
            what = (f"@swr.{user[0]} on {getattr(fn, '__module__', '?')}."
                    f"{getattr(fn, '__qualname__', repr(fn))}")
        where = f"Flask app {app.name!r}" if app is not None else "no Flask app"
        raise NotSetUp(
            f"{what} is used with {where}, which was never set up for swr-cache: call "
            "swr.init_app(app) (or create it as SWR(app)) once the app exists, before it "
            "serves a request")

    # -- decorators ----------------------------------------------------------------------

    def cached(self, max_age: float | None = None, stale_while_revalidate: float | None = None,
               stale_if_error: float | None = None, *, timeout: float | None = None,
               key_prefix: str | Callable[[], str] = "view/%s", query_string: bool = True,
               vary: tuple[str, ...] | list[str] = (), unless: Callable[..., bool] | None = None,
               forced_update: Callable[[], bool] | None = None,
               response_filter: Callable[[Any], bool] | None = None,
               make_cache_key: Callable[..., str] | None = None, source_check: bool = False,
               **ignored: Any) -> Callable[[F], F]:
        """Cache a view (keyed by path, query and ``vary`` headers) or a function (keyed
        by its arguments) with stale-while-revalidate semantics.

        Flask-Caching's parameters mean what they mean there (``timeout`` is
        ``max_age``); ``hash_method``, ``cache_none`` and ``response_hit_indication`` are
        accepted and have nothing to do here (keys are hashed with SHA-256, ``None`` is a
        value like any other, and every answer says ``X-Cache``).
        """
        _only_known(ignored)
        opts = Options(max_age if max_age is not None else timeout, stale_while_revalidate,
                       stale_if_error, key_prefix, query_string, tuple(vary), unless,
                       forced_update, response_filter, make_cache_key, None, source_check)
        return lambda f: decorate(f, opts, self._getter("cached", f),  # type: ignore
                                  function_only=False)

    def memoize(self, max_age: float | None = None, stale_while_revalidate: float | None = None,
                stale_if_error: float | None = None, *, timeout: float | None = None,
                make_name: Callable[[str], str] | None = None,
                unless: Callable[..., bool] | None = None,
                forced_update: Callable[[], bool] | None = None,
                response_filter: Callable[[Any], bool] | None = None,
                source_check: bool = False, args_to_ignore: tuple[str, ...] | list[str] = (),
                **ignored: Any) -> Callable[[F], F]:
        """Cache a function by its arguments (inside a request too), like Flask-Caching's
        ``memoize``, with stale-while-revalidate semantics."""
        _only_known(ignored)
        opts = Options(max_age if max_age is not None else timeout, stale_while_revalidate,
                       stale_if_error, unless=unless, forced_update=forced_update,
                       response_filter=response_filter, make_name=make_name,
                       source_check=source_check, args_to_ignore=tuple(args_to_ignore))
        return lambda f: decorate(f, opts, self._getter("memoize", f),  # type: ignore
                                  function_only=True)

    def _getter(self, decorator: str, fn: Callable[..., Any]) -> Callable[[], AppState]:
        return lambda: self._state_for((decorator, fn))

    def delete_memoized(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Forget one call of a function decorated with :meth:`memoize` or :meth:`cached`
        (same arguments, same key), or, without arguments, every call of it, as
        Flask-Caching does (see :func:`service.decorators.delete_memoized`)."""
        delete_memoized(self.state(), f, args, kwargs)

    # -- periodic functions ------------------------------------------------------------------

    def periodic(self, name: str, every: float, stale_while_revalidate: float | None = None,
                 stale_if_error: float = 86400.0) -> Callable[[Callable[[], R]], Callable[[], R]]:
        """Recompute ``fn`` every ``every`` seconds by one worker of the fleet (a
        module-level deque refilled by a background scheduler, done right). Read it with
        :meth:`value`. Registration only records it: the loop starts with the refresher,
        in the worker."""
        windows = Windows(every, every * 2 if stale_while_revalidate is None
                          else stale_while_revalidate, stale_if_error)

        def decorator(fn: Callable[[], R]) -> Callable[[], R]:
            self._periodic[name] = (fn, every, windows)
            if self.app is not None:
                self.state().region.periodic(Job(name, fn, windows, source=name), every)
            return fn

        return decorator

    def value(self, name: str) -> Any:
        """The latest value of a periodic function (waits only on a cold cache)."""
        if name not in self._periodic:
            raise KeyError(f"no periodic function named {name!r}")
        fn, _every, windows = self._periodic[name]
        return self.get_or_load(name, fn, windows, source=name).value

    def get_or_load(self, key: str, fetch: Callable[[], Any], windows: Windows,
                    source: str = "-") -> Result:
        """The general form behind the decorators: read ``key``, loading it with
        ``fetch`` when needed (see :meth:`service.region.Region.get_or_load`)."""
        return self.state().region.get_or_load(Job(key, fetch, windows, source=source))

    def invalidate(self, key: str) -> None:
        self.state().region.invalidate(key)


def _flag(value: Any) -> bool:
    """A config switch: ``True``, or a string such as ``"1"``, ``"true"``, ``"yes"``."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _only_known(ignored: dict[str, Any]) -> None:
    unknown = set(ignored) - {"hash_method", "cache_none", "response_hit_indication"}
    if unknown:
        raise TypeError(f"unexpected decorator parameter(s): {', '.join(sorted(unknown))}")
