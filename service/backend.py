"""A Flask-Caching backend over the pooled pymemcache store.

Flask-Caching's own memcached backends never pick pymemcache and pickle every value.
This one is loaded through ``CACHE_TYPE = "service.backend.MemcachedCache"``: Flask-Caching
calls ``factory(app, config, args, kwargs)`` and we build the backend over the pool that
:func:`service.clients.init_app` configured. Values use the safe codec, keys of any content
are hashed into legal ones, and ``cache.get/set/add/delete/get_many/set_many`` as well as
``@cache.cached`` and ``@cache.memoize`` work unchanged.

Flask-Caching's contract is "a cache failure is a miss", so memcached being down makes
``get`` return ``None`` and ``set`` return ``False`` (logged and counted by the
connection) rather than raising into the view.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from flask import Flask
from flask_caching.backends.base import BaseCache

from .clients import EXTENSION, get_connection, pool_for
from .config import CacheSettings
from .errors import CacheUnavailable, CodecError
from .store import MISS, Store

log = logging.getLogger(__name__)


class MemcachedCache(BaseCache):
    """Flask-Caching backend; see the module docstring.

    :param settings: the ``[cache]`` settings; ``key_prefix`` namespaces the keys,
        with ``:fc`` appended so view caches never collide with the service's entries.
    """

    def __init__(self, settings: CacheSettings, default_timeout: int = 300) -> None:
        super().__init__(default_timeout=default_timeout)
        self.store = Store(pool_for(settings), f"{settings.key_prefix}.fc",
                           settings.item_size_max)

    @classmethod
    def factory(
        cls, app: Flask, config: dict[str, Any], args: list[Any], kwargs: dict[str, Any]
    ) -> MemcachedCache:
        """Called by Flask-Caching's ``init_app`` with four arguments."""
        state = app.extensions.get(EXTENSION)
        if state is None:
            raise RuntimeError(
                "service.backend.MemcachedCache needs service.clients.init_app(app) first"
            )
        return cls(state["settings"], default_timeout=kwargs.get("default_timeout", 300))

    def _ttl(self, timeout: int | timedelta | None) -> float:
        return float(self._normalize_timeout(timeout))

    def get(self, key: str) -> Any:
        try:
            value = self.store.get(key)
        except CacheUnavailable:
            return None
        return None if value is MISS else value

    def get_many(self, *keys: str) -> list[Any]:
        try:
            found = self.store.get_many(keys)
        except CacheUnavailable:
            found = {}
        return [found.get(k) for k in keys]

    def has(self, key: str) -> bool:
        try:
            return self.store.get(key) is not MISS
        except CacheUnavailable:
            return False

    def set(self, key: str, value: Any, timeout: int | timedelta | None = None) -> bool:
        return self._write(self.store.set, key, value, timeout)

    def add(self, key: str, value: Any, timeout: int | timedelta | None = None) -> bool:
        return self._write(self.store.add, key, value, timeout)

    def set_many(
        self, mapping: dict[str, Any], timeout: int | timedelta | None = None
    ) -> list[Any]:
        return [k for k, v in mapping.items() if not self.set(k, v, timeout)]

    def _write(self, op: Any, key: str, value: Any, timeout: int | timedelta | None) -> bool:
        try:
            return bool(op(key, value, self._ttl(timeout)))
        except CodecError as exc:
            log.warning("not cached: %s", exc)
            return False
        except CacheUnavailable:
            return False

    def delete(self, key: str) -> bool:
        try:
            return self.store.delete(key)
        except CacheUnavailable:
            return False

    def delete_many(self, *keys: str) -> list[Any]:
        return [k for k in keys if self.delete(k)]

    def inc(self, key: str, delta: int = 1) -> int | None:
        """Atomic across workers and hosts; the counter is created at 0 if absent."""
        command = "incr" if delta >= 0 else "decr"
        mkey = self.store.key(key)
        try:
            self.store.add_counter(key, 0)
            conn = get_connection()
            result = conn.call(
                conn.server_for(mkey), command,
                lambda c: getattr(c, command)(mkey, abs(delta)),
            )
        except CacheUnavailable:
            return None
        return None if result is None else int(result)

    def dec(self, key: str, delta: int = 1) -> int | None:
        return self.inc(key, -delta)

    def clear(self) -> bool:
        """Not supported: memcached is shared, and ``flush_all`` would empty every
        namespace on it. Use :meth:`delete`, or change ``key_prefix``."""
        log.warning("MemcachedCache.clear() is not supported on a shared memcached")
        return False
