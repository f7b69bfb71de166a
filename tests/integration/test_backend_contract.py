"""cachelib's ``BaseCache`` contract, as one generic suite (dogpile's shape).

:class:`BaseCacheContract` says what every Flask-Caching backend must do; it runs against
our memcached backend (a real memcached, with and without an app context) and against
Flask-Caching's own ``SimpleCache``, which proves the suite encodes the real contract and
not our reading of it. Where memcached legitimately differs, a class attribute says so
(``clears``), and the memcached-only guarantees are tests of their own below.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask, has_app_context
from flask_caching import Cache
from flask_caching.backends import SimpleCache
from flask_caching.backends.base import BaseCache

from service.memcache.clients import close_pools

pytestmark = pytest.mark.memcached

MakeCache = Callable[..., BaseCache]

VALUES: dict[str, Any] = {
    "text": "spam", "empty text": "", "bytes": b"\x00\xffbytes", "zero": 0, "int": 2048,
    "big int": 5_000_000_000_000, "huge int": 2**70, "negative": -7, "float": 1.5,
    "true": True, "false": False, "none": None, "list": ["baked beans", [512]],
    "empty list": [], "dict": {"sauce": [], "nested": {"a": 1}}, "empty dict": {},
    "dict with int keys": {256: "truffle", "x": 1}, "tuple": (1, "two", (3,)),
    "mixed": [{}, "fried eggs", (None, b"b")],
}
ODD_KEYS = ["with space", "cr\r\nlf", "nul\x00", "ünïcödé 键 🦄", "k" * 10_000, "\t\x01\x7f", ""]


def memcached_cache(app: Flask, memcached: Any, **config: Any) -> Cache:
    """Flask-Caching over our backend on a plain Flask app: nothing else set up. Each
    cache gets its own key prefix, so tests never see each other's keys."""
    return Cache(app, config={
        "CACHE_TYPE": "service.backend.MemcachedCache",
        "CACHE_MEMCACHED_SERVERS": [memcached.address],
        "CACHE_KEY_PREFIX": f"contract-{uuid.uuid4().hex[:12]}",
        "CACHE_OPTIONS": {"pool_size": 4, "timeout": 0.5, "connect_timeout": 0.5,
                          "circuit_reset": 0.2},
        **config,
    })


class BaseCacheContract:
    """The contract; a subclass provides ``make(default_timeout=300)``."""

    clears = True  # clear() empties the cache

    @pytest.fixture
    def make(self) -> MakeCache:
        raise NotImplementedError

    @pytest.fixture
    def c(self, make: MakeCache) -> BaseCache:
        return make()

    def test_get_of_a_missing_key_is_none(self, c: BaseCache) -> None:
        assert c.get("missing") is None
        assert c.has("missing") is False

    def test_set_then_get_gives_the_value_back(self, c: BaseCache) -> None:
        for name, value in VALUES.items():
            assert c.set(name, value) is True, name
            assert c.get(name) == value, name
            assert type(c.get(name)) is type(value), name
            assert c.has(name) is True, name

    def test_set_overwrites(self, c: BaseCache) -> None:
        assert c.set("k", "first") and c.set("k", ["second"])
        assert c.get("k") == ["second"]

    def test_keys_of_any_content(self, c: BaseCache) -> None:
        for key in ODD_KEYS:
            assert c.set(key, f"value of {key[:10]}"), repr(key[:12])
        for key in ODD_KEYS:
            assert c.get(key) == f"value of {key[:10]}", repr(key[:12])
            assert c.get(key + "!") is None
        assert c.get(ODD_KEYS[4][:250]) is None     # hashed, never truncated

    def test_get_many_and_get_dict_keep_order_and_fill_misses_with_none(
        self, c: BaseCache
    ) -> None:
        assert c.set("a", "A") and c.set("b", ["B"])
        assert c.get_many("b", "missing", "a") == [["B"], None, "A"]
        assert c.get_dict("a", "missing") == {"a": "A", "missing": None}
        assert c.get_many() == []

    def test_set_many_returns_the_keys_it_stored(self, c: BaseCache) -> None:
        assert c.set_many(VALUES) == list(VALUES)
        assert c.get_many(*VALUES) == list(VALUES.values())
        assert c.set_many({}) == []

    def test_add_stores_only_when_absent(self, c: BaseCache) -> None:
        assert c.add("k", "first") is True
        assert c.add("k", "second") is False
        assert c.get("k") == "first"
        assert c.delete("k")
        assert c.add("k", "third") is True and c.get("k") == "third"

    def test_delete_says_whether_the_key_was_there(self, c: BaseCache) -> None:
        assert c.set("k", 1)
        assert c.delete("k") is True
        assert c.get("k") is None and c.has("k") is False
        assert c.delete("k") is False

    def test_delete_many_returns_the_keys_now_absent(self, c: BaseCache) -> None:
        assert c.set_many({"a": 1, "b": 2, "keep": 3}) == ["a", "b", "keep"]
        # cachelib counts a key that was not there as deleted: it is absent afterwards.
        assert c.delete_many("a", "never-set", "b") == ["a", "never-set", "b"]
        assert c.get_many("a", "b", "keep") == [None, None, 3]

    def test_none_is_a_value(self, c: BaseCache) -> None:
        assert c.set("k", None)
        assert c.has("k") is True and c.get("k") is None

    def test_inc_and_dec_create_missing_keys(self, c: BaseCache) -> None:
        assert c.inc("hits") == 1 and c.get("hits") == 1
        assert c.inc("hits", 41) == 42 == c.get("hits")
        assert c.dec("debt", 10) == -10 == c.get("debt")

    def test_counters_are_ordinary_values(self, c: BaseCache) -> None:
        for n in [0, 9, 10, 99, 738, 2_000_000, 5_000_000_000_000]:
            key = f"n{n}"
            assert c.set(key, n)
            assert c.inc(key) == n + 1 == c.get(key)
            assert c.dec(key, 5) == n - 4 == c.get(key)     # below zero when n < 4
            assert c.dec(key, n) == -4 == c.get(key)
            assert c.inc(key, 4) == 0 == c.get(key)
            assert c.set(key, "not a counter now") and c.get(key) == "not a counter now"

    def test_inc_after_set_many(self, c: BaseCache) -> None:
        c.set_many({"x": 5, "y": -5})
        assert (c.inc("x"), c.inc("y")) == (6, -4)
        assert c.get_many("x", "y") == [6, -4]

    def test_a_negative_timeout_stores_an_already_expired_value(self, c: BaseCache) -> None:
        assert c.set("k", "old")
        assert c.set("k", "new", timeout=-1) is True
        assert c.get("k") is None and c.has("k") is False
        assert c.add("fresh", "v", timeout=-1) is True
        assert c.get("fresh") is None
        assert c.set_many({"m": 1}, timeout=-5) == ["m"]
        assert c.get("m") is None

    def test_timedelta_timeouts(self, make: MakeCache) -> None:
        c = make(default_timeout=timedelta(minutes=5))
        assert c.default_timeout == 300
        assert c.set("k", "v", timeout=timedelta(seconds=30))
        assert c.add("a", "v", timeout=timedelta(hours=1))
        assert c.get_many("k", "a") == ["v", "v"]

    def test_expiry(self, make: MakeCache) -> None:
        c = make()
        short = make(default_timeout=1)
        assert c.set("forever", "v", timeout=0)
        assert c.set("one second", "v", timeout=1)
        assert c.add("added", "v", timeout=timedelta(seconds=1))
        assert short.set("default", "v")
        assert short.set("explicit forever", "v", timeout=0)
        assert c.get("one second") == "v"
        # memcached expires on its whole-second clock: within 2 s of the deadline.
        time.sleep(2.5)
        assert c.get("forever") == "v" and short.get("explicit forever") == "v"
        assert c.get_many("one second", "added") == [None, None]
        assert short.get("default") is None and short.has("default") is False

    def test_clear(self, c: BaseCache) -> None:
        assert c.set_many({"a": 1, "b": 2}) == ["a", "b"]
        assert c.clear() is self.clears
        expected = [None, None] if self.clears else [1, 2]
        assert c.get_many("a", "b") == expected


class TestSimpleCacheReference(BaseCacheContract):
    """Flask-Caching's in-process backend: the reference the suite is checked against."""

    @pytest.fixture
    def make(self) -> MakeCache:
        return lambda default_timeout=300: SimpleCache(default_timeout=default_timeout)


class TestMemcachedCacheInAppContext(BaseCacheContract):
    clears = False  # refused on a shared memcached; see test_clear_is_refused_and_says_why

    @pytest.fixture
    def make(self, memcached: Any) -> Iterator[MakeCache]:
        app = Flask(__name__)

        def make(default_timeout: Any = 300) -> BaseCache:
            cache = memcached_cache(app, memcached, CACHE_DEFAULT_TIMEOUT=default_timeout)
            assert has_app_context()
            backend: BaseCache = cache.cache
            return backend

        with app.app_context():
            yield make
        close_pools()


class TestMemcachedCacheOutsideAppContext(BaseCacheContract):
    """A CLI command, a worker thread, a script: no app context, same contract."""

    clears = False

    @pytest.fixture
    def make(self, memcached: Any) -> Iterator[MakeCache]:
        app = Flask(__name__)

        def make(default_timeout: Any = 300) -> BaseCache:
            cache = memcached_cache(app, memcached, CACHE_DEFAULT_TIMEOUT=default_timeout)
            assert not has_app_context()
            backend: BaseCache = cache.cache
            return backend

        yield make
        close_pools()


class TestMemcachedCacheWithStaleWindows(BaseCacheContract):
    """Issue 11: with CACHE_STALE_WHILE_REVALIDATE and CACHE_STALE_IF_ERROR switched on
    (herd protection included), plain get/set users see the same contract."""

    clears = False

    @pytest.fixture
    def make(self, memcached: Any) -> Iterator[MakeCache]:
        app = Flask(__name__)

        def make(default_timeout: Any = 300) -> BaseCache:
            cache = memcached_cache(app, memcached, CACHE_DEFAULT_TIMEOUT=default_timeout,
                                    CACHE_STALE_WHILE_REVALIDATE=30, CACHE_STALE_IF_ERROR=60)
            backend: BaseCache = cache.cache
            return backend

        with app.app_context():
            yield make
        close_pools()
