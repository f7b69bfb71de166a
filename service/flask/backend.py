"""A Flask-Caching backend over the pooled pymemcache store.

Flask-Caching's own memcached backends never pick pymemcache and pickle every value.
This one is loaded through ``CACHE_TYPE = "service.backend.MemcachedCache"``: Flask-Caching
calls ``factory(app, config, args, kwargs)``, and the backend is built from that config
alone (``CACHE_MEMCACHED_SERVERS``, ``CACHE_KEY_PREFIX``, ``CACHE_DEFAULT_TIMEOUT``,
``CACHE_OPTIONS``; see :func:`service.flaskconfig.settings_from_flask`), with no other extension
initialised first. Two ``Cache`` objects with different prefixes never see each other's
keys; with the same servers and timeouts they share one connection pool.

It honours cachelib's ``BaseCache`` contract with or without an app context (a CLI
command or a worker thread caches like a view): the return values of every method,
``timeout`` 0 = forever and negative = already expired, ``timedelta`` timeouts, keys of
any content (hashed, never truncated), and counters that are ordinary values (``set("n",
5); inc("n") == 6 == get("n")``). Values use the safe codec: a value it cannot represent
is logged and not cached (``set`` returns ``False``); nothing is ever pickled.

Flask-Caching's contract is "a cache failure is a miss": memcached down, slow or refusing
makes ``get`` return ``None`` and ``set`` ``False`` (logged and counted where the
connection fails) rather than raising into the view.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from flask import Flask
from flask_caching.backends.base import BaseCache
from werkzeug.wrappers import Response

from ..config import CacheSettings, RefreshSettings
from ..errors import CacheUnavailable, CodecError
from ..memcache.clients import pool_for
from ..memcache.store import EMPTY, MISS, Store
from ..observe.logs import event, key_hash
from ..readpath.entry import Entry
from .coalesce import Coalescer
from .flaskconfig import POOL_OPTIONS, settings_from_flask
from .responses import shareable

log = logging.getLogger(__name__)
Timeout = int | timedelta | None


def flask_caching_config(cache: CacheSettings) -> dict[str, Any]:
    """The Flask-Caching config that builds this backend over ``cache``:
    ``Cache(config=flask_caching_config(settings.cache))``. The round trip through
    :func:`service.flaskconfig.settings_from_flask` gives the same settings back."""
    return {
        "CACHE_TYPE": "service.backend.MemcachedCache",
        "CACHE_MEMCACHED_SERVERS": list(cache.servers),
        "CACHE_KEY_PREFIX": cache.key_prefix,
        "CACHE_DEFAULT_TIMEOUT": cache.default_timeout,
        "CACHE_STALE_WHILE_REVALIDATE": cache.stale_while_revalidate,
        "CACHE_STALE_IF_ERROR": cache.stale_if_error,
        "CACHE_OPTIONS": {name: getattr(cache, name) for name in POOL_OPTIONS},
    }


class MemcachedCache(BaseCache):
    """Flask-Caching backend; see the module docstring.

    :param settings: the ``[cache]`` settings. Keys live in the namespace
        ``f"{key_prefix}.fc"``, apart from the stale-while-revalidate entries
        (``.swr``) of the same prefix.
    :param default_timeout: by default ``settings.default_timeout``.
    :param ignore_delete_many_errors: Flask-Caching's ``CACHE_IGNORE_ERRORS``; see
        :meth:`delete_many`.
    """

    def __init__(self, settings: CacheSettings, default_timeout: Timeout = None,
                 ignore_delete_many_errors: bool = False,
                 refresh: RefreshSettings | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if default_timeout is None:
            default_timeout = settings.default_timeout
        if isinstance(default_timeout, timedelta):
            default_timeout = math.ceil(default_timeout.total_seconds())
        super().__init__(default_timeout, ignore_delete_many_errors)
        self.settings = settings
        self.store = Store(pool_for(settings), f"{settings.key_prefix}.fc",
                           settings.item_size_max)
        self.herd = Coalescer(self.store, refresh or RefreshSettings(),
                              settings.stale_while_revalidate, settings.stale_if_error,
                              clock, monotonic)

    @classmethod
    def factory(
        cls, app: Flask, config: dict[str, Any], args: list[Any], kwargs: dict[str, Any]
    ) -> MemcachedCache:
        """Called by Flask-Caching's ``init_app`` with four arguments.

        :param config: the app's config merged with the ``Cache`` object's own.
        :param kwargs: ``default_timeout`` (``CACHE_DEFAULT_TIMEOUT``, or the one in
            ``CACHE_OPTIONS``, as Flask-Caching resolved it), ``ignore_delete_many_errors``
            and the ``CACHE_OPTIONS``, which ``config`` holds too.
        :raises ConfigError: a bad ``CACHE_*`` value, named as in the Flask config.
        """
        settings = settings_from_flask(config)
        backend = cls(settings.cache, default_timeout=kwargs.get("default_timeout"),
                      ignore_delete_many_errors=bool(kwargs.get("ignore_delete_many_errors")),
                      refresh=settings.refresh)
        # A caller that took a key's lease in get() and never stored gives it back when
        # its request (app context) ends, instead of making the others wait it out.
        app.teardown_appcontext(lambda exc: backend.herd.release_all())
        return backend

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        """The value, or ``None``; concurrent misses of one key coalesce fleet-wide and
        expired values are served stale while one caller recomputes
        (:mod:`service.coalesce`)."""
        return self.herd.get(key)

    def get_many(self, *keys: str) -> list[Any]:
        try:
            found = self.store.get_many(keys)
        except CacheUnavailable:
            found = {}
        return [self.herd.unwrap(found.get(k)) for k in keys]

    def has(self, key: str) -> bool:
        """Present and not past its timeout (a value served stale-while-revalidate by
        :meth:`get` is not "had": the plain contract)."""
        try:
            raw = self.store.get(key)
        except CacheUnavailable:
            return False
        if raw is MISS or not Entry.is_wire(raw):
            return raw is not MISS
        entry = self.herd.entry_of(raw)
        return entry is not None and self.herd.fresh(entry)

    # -- writes --------------------------------------------------------------------------

    def set(self, key: str, value: Any, timeout: Timeout = None) -> bool:
        return self._write(self.store.set, key, value, timeout, recompute=True)

    def add(self, key: str, value: Any, timeout: Timeout = None) -> bool:
        return self._write(self.store.add, key, value, timeout, recompute=False)

    def _write(self, op: Callable[[str, Any, float], bool], key: str, value: Any,
               timeout: Timeout, recompute: bool) -> bool:
        seconds = self._normalize_timeout(timeout)
        if isinstance(value, Response) and not shareable(value):
            # A response that sets a cookie, or says private or no-store, answers its own
            # request only: never stored, so never served to anyone else.
            return False
        try:
            if recompute:
                claimed = self.herd.set_claimed(key, value, seconds)
                if claimed is not None:
                    return claimed  # this caller's recompute: written fenced, lease released
            return bool(op(key, self.herd.envelope(value, seconds),
                           self.herd.memcached_ttl(seconds)))
        except CodecError as exc:
            event(log, logging.WARNING, "not_cached",
                  f"not cached (key {key_hash(key)}): the value cannot be stored: {exc}",
                  key=key)
        except CacheUnavailable:
            pass
        return False

    def set_many(self, mapping: dict[str, Any], timeout: Timeout = None) -> list[Any]:
        """The keys stored (a value the codec refuses is logged and left out)."""
        seconds = self._normalize_timeout(timeout)
        return [key for key, value in mapping.items() if self.set(key, value, seconds)]

    def delete(self, key: str) -> bool:
        """``True`` if the key existed; ``False`` if absent, or memcached failed.

        A recompute's claim under the key (the empty item of a ``get`` that missed) is
        deleted too, so that recompute's fenced ``set`` cannot undo this delete, but a
        claim is no value: deleting only a claim answers ``False``.
        """
        self.herd.forget(key)
        try:
            claim_only = self.store.mget(key).value is EMPTY
            return self.store.mdelete(key) == "HD" and not claim_only
        except CacheUnavailable:
            return False

    def delete_many(self, *keys: str) -> list[Any]:
        """The keys absent after the call (deleted, or not there), as cachelib counts them.

        memcached either deletes a key or answers that it is absent, so there is never a
        key that "still exists" for ``ignore_delete_many_errors`` to raise about. Keys
        memcached could not be asked about are left out of the result, not raised.
        """
        done: list[str] = []
        try:
            for key in keys:
                self.store.delete(key)
                done.append(key)
        except CacheUnavailable:
            pass
        return done

    # -- counters ------------------------------------------------------------------------

    def inc(self, key: str, delta: int = 1) -> int | None:
        """Add ``delta``; atomic across workers and hosts.

        A missing key starts from 0 (and lives ``default_timeout``); the result can go
        below zero; the value is an ordinary one for :meth:`get`/:meth:`set`.

        :return: the new value, or ``None`` when memcached failed or the value under
            ``key`` is not an integer (logged).
        """
        try:
            return self.store.increment(key, delta, self.default_timeout)
        except CacheUnavailable:
            return None

    def dec(self, key: str, delta: int = 1) -> int | None:
        """Subtract ``delta``; see :meth:`inc`."""
        return self.inc(key, -delta)

    def clear(self) -> bool:
        """Refused: memcached is shared, and ``flush_all`` would empty every namespace on
        the server (other apps', the service's entries, leases, counters)."""
        log.warning(
            "MemcachedCache.clear() refused: memcached is shared and flush_all would empty "
            "every namespace on %s, not just %r. Delete keys with delete()/delete_many(), "
            "or move to a new namespace by changing CACHE_KEY_PREFIX.",
            ", ".join(self.settings.servers), self.store.namespace,
        )
        return False
