"""``from service import Cache``: Flask-Caching's ``Cache``, with no caller waiting for a
refresh.

A drop-in subclass: same constructor, same config, same decorator parameters. Plain
Flask-Caching code over ``service.backend.MemcachedCache`` already gets herd protection
and stale-while-revalidate by configuration (:mod:`service.coalesce`), but the caller that
gets the lease still recomputes in its own request. With this class, ``@cache.cached`` and
``@cache.memoize`` read through the read path of ``@swr.cached``/``@swr.memoize`` (the same
:func:`service.decorators.decorate`): a stale entry is answered at once and recomputed by
the worker's background refresher, by one worker of the fleet.

Windows: the decorator's ``timeout`` (or ``CACHE_DEFAULT_TIMEOUT``) is ``max_age``;
``stale_while_revalidate`` / ``stale_if_error`` per decorator, or
``CACHE_STALE_WHILE_REVALIDATE`` / ``CACHE_STALE_IF_ERROR``. Flask-Caching's defaults are
kept (``query_string=False``: a view is keyed by its path unless asked otherwise).
Entries of the decorators live in the read path's namespace; ``cache.delete(key)``,
``delete_many`` and ``delete_memoized`` invalidate them as Flask-Caching users expect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import flask_caching
from flask import Flask, current_app, has_app_context

from ..memcache import clients
from .decorators import Options, decorate, delete_memoized
from .flaskconfig import library_settings
from .state import EXTENSION, AppState, build, state_of

F = TypeVar("F", bound=Callable[..., Any])


class Cache(flask_caching.Cache):
    """See the module docstring."""

    def init_app(self, app: Flask, config: dict[str, Any] | None = None) -> None:
        super().init_app(app, config)
        if EXTENSION not in app.extensions:
            settings = library_settings({**app.config, **(self.config or {}),
                                         **(config or {})})
            build(app, settings)
            clients.init_app(app, settings.cache)

    def _state(self) -> AppState:
        if has_app_context():
            return state_of(current_app._get_current_object())  # type: ignore[attr-defined]
        if self.app is None:
            raise RuntimeError("Cache is not set up: call cache.init_app(app) first")
        return state_of(self.app)

    def cached(  # type: ignore[override]
        self, timeout: Any = None, key_prefix: str | Callable[[], str] = "view/%s",
        unless: Callable[..., Any] | None = None,
        forced_update: Callable[..., Any] | None = None,
        is_stale: Callable[..., Any] | None = None,
        response_filter: Callable[..., Any] | None = None, query_string: bool = False,
        hash_method: Any = None, cache_none: bool = False,
        make_cache_key: Callable[..., Any] | None = None, source_check: bool | None = None,
        response_hit_indication: bool | None = False,
        stale_while_revalidate: float | None = None, stale_if_error: float | None = None,
    ) -> Callable[[F], F]:
        """Flask-Caching's ``cached``, answered through the read path (module docstring).
        ``hash_method`` and ``cache_none`` are accepted and change nothing here (keys are
        SHA-256; ``None`` is a value like any other)."""
        opts = Options(_seconds(timeout), stale_while_revalidate, stale_if_error, key_prefix,
                       query_string, (), unless, forced_update, response_filter,
                       make_cache_key, None, bool(source_check), (), is_stale,
                       bool(response_hit_indication))
        return lambda f: decorate(f, opts, self._state, function_only=False)  # type: ignore

    def memoize(  # type: ignore[override]
        self, timeout: Any = None, make_name: Callable[[str], str] | None = None,
        unless: Callable[..., Any] | None = None,
        forced_update: Callable[..., Any] | None = None,
        response_filter: Callable[..., Any] | None = None, hash_method: Any = None,
        cache_none: bool = False, source_check: bool | None = None,
        args_to_ignore: Any = None, stale_while_revalidate: float | None = None,
        stale_if_error: float | None = None,
    ) -> Callable[[F], F]:
        """Flask-Caching's ``memoize``, answered through the read path."""
        opts = Options(_seconds(timeout), stale_while_revalidate, stale_if_error,
                       unless=unless, forced_update=forced_update,
                       response_filter=response_filter, make_name=make_name,
                       source_check=bool(source_check),
                       args_to_ignore=tuple(args_to_ignore or ()))
        return lambda f: decorate(f, opts, self._state, function_only=True)  # type: ignore

    def delete_memoized(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Forget one call of a decorated function (with its arguments), or, without
        arguments, every call of it, as in Flask-Caching (a function decorated by plain
        Flask-Caching is left to it)."""
        if getattr(getattr(f, "__func__", f), "make_call_key", None) is None:
            super().delete_memoized(f, *args, **kwargs)  # type: ignore[arg-type]
            return
        delete_memoized(self._state(), f, args, kwargs)

    def delete_memoized_verhash(self, f: Callable[..., Any], *args: Any) -> None:
        """Flask-Caching's "forget every call of ``f``" by its version hash: here, by its
        generation (``delete_memoized(f)``)."""
        if getattr(getattr(f, "__func__", f), "forget_calls", None) is None:
            super().delete_memoized_verhash(f, *args)  # type: ignore[arg-type]
            return
        delete_memoized(self._state(), f, (), {})

    def delete(self, *args: Any, **kwargs: Any) -> bool:
        """Delete a key from the backend and, with the same name, a decorator's entry."""
        deleted = bool(super().delete(*args, **kwargs))
        key = args[0] if args else kwargs.get("key")
        if isinstance(key, str):
            self._state().region.invalidate(key)
        return deleted

    def delete_many(self, *args: Any, **kwargs: Any) -> list[str]:
        deleted: list[str] = super().delete_many(*args, **kwargs)
        for key in args:
            if isinstance(key, str):
                self._state().region.invalidate(key)
        return deleted


def _seconds(timeout: Any) -> float | None:
    if timeout is None:
        return None
    seconds = getattr(timeout, "total_seconds", None)
    return float(seconds() if seconds is not None else timeout)
