"""An in-memory stand-in for :class:`service.memcache.store.Store`, on a fake clock.

For unit tests of pure decisions (region, loader, waiter, fencing): the same operations
and return values as the memcached store (``add`` fails when present, ``cas`` answers
``None`` when the key is gone and ``False`` when it changed, items expire), with no
sockets. It is never the proof that the system works with memcached: the integration
suite is.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from service.errors import CacheUnavailable
from service.memcache.store import EMPTY, MISS, Got, KeyValue, Stored

_tokens = itertools.count(1)


class MemoryStore:
    """Keys to ``(value, cas token, expires_at or None)``; values are deep-copied in and
    out, as the codec would. ``down = True`` makes every call raise CacheUnavailable."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.items: dict[str, tuple[Any, bytes, float | None]] = {}
        self._down = [False]
        self.calls: list[str] = []
        self.won: set[str] = set()
        self.prefix = ""
        self._families: dict[str, dict[str, tuple[Any, bytes, float | None]]] = {}

    @property
    def down(self) -> bool:
        return self._down[0]

    @down.setter
    def down(self, value: bool) -> None:
        self._down[0] = value

    def flush(self) -> None:
        """Every item gone, the families' too: memcached restarted empty."""
        self.items.clear()
        for items in self._families.values():
            items.clear()

    def child(self, family: str, follow: bool = False) -> MemoryStore:
        """A family's items, apart from this store's (as Store.child: its own namespace,
        so no key of this store can name one of them); the same calls, won and down."""
        view = MemoryStore.__new__(MemoryStore)
        view.__dict__.update(self.__dict__)
        view.items = self._families.setdefault(family, {})
        view._families = {}
        return view

    def key(self, key: str) -> bytes:
        return key.encode("utf-8", "backslashreplace")

    def _check(self, op: str) -> None:
        self.calls.append(op)
        if self.down:
            raise CacheUnavailable(f"memory store is down ({op})")

    def _live(self, key: str) -> tuple[Any, bytes, float | None] | None:
        key = self.prefix + key
        item = self.items.get(key)
        if item is not None and item[2] is not None and self.clock() >= item[2]:
            del self.items[key]
            return None
        return item

    def _put(self, key: str, value: Any, ttl: float | None) -> None:
        expires = self.clock() + ttl if ttl and ttl > 0 else None
        if ttl is not None and ttl < 0:
            expires = self.clock()
        kept = value if value is EMPTY else copy.deepcopy(value)
        self.items[self.prefix + key] = (kept, str(next(_tokens)).encode(), expires)

    def gets(self, key: str) -> tuple[Any, bytes | None]:
        self._check("gets")
        item = self._live(key)
        return (MISS, None) if item is None else (copy.deepcopy(item[0]), item[1])

    def get(self, key: str) -> Any:
        return self.gets(key)[0]

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        self._check("get_many")
        out = {}
        for key in keys:
            item = self._live(key)
            if item is not None:
                out[key] = copy.deepcopy(item[0])
        return out

    def set(self, key: str, value: Any, ttl: float | None = None) -> bool:
        self._check("set")
        self._put(key, value, ttl)
        return True

    def add(self, key: str, value: Any, ttl: float | None = None) -> bool:
        self._check("add")
        if self._live(key) is not None:
            return False
        self._put(key, value, ttl)
        return True

    def cas(self, key: str, value: Any, token: bytes, ttl: float | None = None) -> bool | None:
        self._check("cas")
        item = self._live(key)
        if item is None:
            return None
        if item[1] != token:
            return False
        self._put(key, value, ttl)
        return True

    def delete(self, key: str) -> bool:
        self._check("delete")
        return self.items.pop(self.prefix + key, None) is not None

    def delete_if(self, key: str, expected: Any) -> bool:
        self._check("delete_if")
        item = self._live(key)
        if item is None or item[0] != expected:
            return False
        del self.items[self.prefix + key]
        return True

    def add_counter(self, key: str, initial: int = 0) -> bool:
        return self.add(key, initial)

    def incr(self, key: str, delta: int = 1) -> int | None:
        self._check("incr")
        item = self._live(key)
        if item is None:
            return None
        value = int(item[0]) + delta
        self.items[self.prefix + key] = (value, str(next(_tokens)).encode(), item[2])
        return value

    def get_counter(self, key: str) -> int | None:
        value = self.get(key)
        return None if value is MISS else int(value)

    # -- the meta commands, as memcached answers them ---------------------------------

    def mget(self, key: str, vivify: float | None = None, route: str | None = None) -> Got:
        self._check("mg")
        item = self._live(key)
        if item is None:
            if vivify is None:
                return Got(MISS)
            self._put(key, EMPTY, vivify)
            item = self.items[self.prefix + key]
            self.won.add(key)
            return Got(EMPTY, item[1], int(vivify), won=True)
        ttl = -1 if item[2] is None else max(0, math.ceil(item[2] - self.clock()))
        value = item[0] if item[0] is EMPTY else copy.deepcopy(item[0])
        return Got(value, item[1], ttl)

    def mset(self, key: str, value: Any, ttl: float | None, cas: bytes | None = None,
             add: bool = False, route: str | None = None) -> Stored:
        self._check("ms")
        item = self._live(key)
        if cas is not None:
            if item is None:
                return Stored("NF")
            if item[1] != cas:
                return Stored("EX")
        if add and item is not None:
            return Stored("NS")
        self._put(key, value, ttl)
        return Stored("HD", self.items[self.prefix + key][1])

    def mdelete(self, key: str, cas: bytes | None = None, route: str | None = None) -> str:
        self._check("md")
        item = self._live(key)
        if item is None:
            return "NF"
        if cas is not None and item[1] != cas:
            return "EX"
        del self.items[self.prefix + key]
        return "HD"

    def touch_if(self, key: str, cas: bytes | None, ttl: float) -> bool:
        self._check("touch")
        item = self._live(key)
        if item is None or item[0] is not EMPTY or item[1] != cas:
            return False
        self.items[self.prefix + key] = (item[0], item[1], self.clock() + ttl)
        return True


if TYPE_CHECKING:
    # `make lint` type-checks this file: the stand-in keeps the store's contract (the
    # read path takes any KeyValue), with no `type: ignore` where a test passes it.
    _CONTRACT: KeyValue = MemoryStore(lambda: 0.0)
