"""Flask-Caching over pymemcache with the safe codec, against a real memcached: the
service's own cache, and the backend alone in a plain Flask app (issue 8)."""

from __future__ import annotations

import collections
import os
import pickle
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import gevent
import pytest
from flask import Flask, has_app_context, jsonify, request
from flask_caching import Cache
from prometheus_client import REGISTRY

from service import cache
from service.config import ConfigError
from service.flask.backend import MemcachedCache
from service.flask.flaskconfig import namespace_for
from service.memcache.clients import close_pools, get_pool
from service.memcache.keys import memcached_key
from service.memcache.store import MISS, Store
from tests.conftest import settings_for

pytestmark = pytest.mark.memcached


@pytest.mark.private_memcached
def test_the_flask_caching_api_works_on_memcached(app: Flask, memcached: Any) -> None:
    with app.app_context():
        assert cache.get("missing") is None
        assert cache.set("a", {"x": [1, 2]})
        assert cache.get("a") == {"x": [1, 2]}
        assert cache.add("a", "other") is False
        assert cache.get("a") == {"x": [1, 2]}
        assert cache.add("b", (1, "two")) is True
        assert cache.get_many("a", "b", "c") == [{"x": [1, 2]}, (1, "two"), None]
        assert cache.set_many({"c": b"\x00", "d": None}) == ["c", "d"]
        assert cache.get("c") == b"\x00"
        assert cache.has("d") and cache.get("d") is None
        assert cache.delete("a") and cache.get("a") is None
        assert cache.cache.inc("n") == 1
        assert cache.cache.inc("n", 5) == 6
        assert cache.cache.dec("n", 2) == 4
    assert int(memcached.stats()["curr_items"]) >= 4


def test_cached_and_memoize_work(app: Flask) -> None:
    calls = {"view": 0, "fn": 0}

    @app.get("/report")
    @cache.cached(timeout=60, query_string=True)
    def report() -> Any:
        calls["view"] += 1
        return jsonify(n=calls["view"], q=request.args.get("q"))

    @cache.memoize(timeout=60)
    def square(x: int) -> int:
        calls["fn"] += 1
        return x * x

    client = app.test_client()
    first = client.get("/report?q=1").get_json()
    assert client.get("/report?q=1").get_json() == first == {"n": 1, "q": "1"}
    assert client.get("/report?q=2").get_json() == {"n": 2, "q": "2"}
    with app.app_context():
        assert [square(3), square(3), square(4)] == [9, 9, 16]
    assert calls == {"view": 2, "fn": 2}


ODD_KEYS = ["with space", "cr\r\nlf", "nul\x00", "ünïcödé 键 🦄", "k" * 10_000, "\t\x01\x7f"]


@pytest.mark.parametrize("key", ODD_KEYS, ids=lambda k: repr(k[:20]))
def test_odd_keys_round_trip(app: Flask, key: str) -> None:
    with app.app_context():
        assert cache.set(key, f"value of {key[:10]}")
        assert cache.get(key) == f"value of {key[:10]}"
        assert cache.get(key + "!") is None      # hashed keys do not collide


class Exploit:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_exploit_in_memcached_never_runs_and_reads_as_a_miss(
    app: Flask, memcached: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Exploit(marker))
    # Written raw, as another app or an attacker on port 11211 could, with pymemcache's
    # pickle flag, under the exact key the service reads.
    memcached.raw_set(memcached_key(namespace_of(app), "victim"), payload, flags=1)
    with app.app_context():
        assert cache.get("victim") is None
        assert cache.get_many("victim") == [None]
        assert cache.has("victim") is False
    assert not marker.exists()


def namespace_of(app: Flask) -> str:
    with app.app_context():
        return str(cache.cache.store.namespace)


@pytest.mark.private_memcached
def test_values_larger_than_an_item_are_split_and_served(memcached: Any, make_app: Any) -> None:
    app = make_app(settings_for([memcached.address]))
    big = os.urandom(3 * 1024 * 1024 + 17)
    with app.app_context():
        assert cache.set("big", big)
        assert cache.get("big") == big
        assert int(memcached.stats()["curr_items"]) >= 4   # manifest + 4 chunks of <1 MiB


@pytest.mark.private_memcached
def test_a_missing_chunk_reads_as_a_miss_not_a_crash(memcached: Any, make_app: Any) -> None:
    app = make_app(settings_for([memcached.address], cache={"item_size_max": 4096}))
    with app.app_context():
        assert cache.set("big", "y" * 50_000)
        assert cache.get("big") == "y" * 50_000
        # Keep the manifest, lose every chunk (as an eviction would).
        store = cache.cache.store
        manifest = memcached.raw_get(store.key("big"))
        assert manifest is not None
        memcached.flush()
        memcached.raw_set(store.key("big"), manifest[0])
        assert cache.get("big") is None


@pytest.mark.private_memcached
def test_memcached_down_is_a_miss_not_an_error(memcached: Any, make_app: Any) -> None:
    app = make_app(settings_for([memcached.address]))
    memcached.stop()
    with app.app_context():
        assert cache.get("a") is None
        assert cache.set("a", 1) is False
    assert get_pool(app).in_use == 0


# -- issue 8: the backend on its own, in a plain Flask app, configured the Flask-Caching way --


@pytest.fixture
def plain_app() -> Iterator[Flask]:
    """A Flask app with nothing of the service initialised."""
    yield Flask(__name__)
    close_pools()


def backend_cache(app: Flask, memcached: Any, **config: Any) -> Cache:
    config.setdefault("CACHE_KEY_PREFIX", f"b8-{uuid.uuid4().hex[:10]}")
    return Cache(app, config={"CACHE_TYPE": "service.backend.MemcachedCache",
                              "CACHE_MEMCACHED_SERVERS": [memcached.address], **config})


def backend_of(cache: Cache) -> MemcachedCache:
    backend = cache.cache
    assert isinstance(backend, MemcachedCache)
    return backend


def ttl_in_memcached(memcached: Any, mkey: bytes) -> int | None:
    reply = memcached.command_line(b"mg " + mkey + b" t")   # meta get: remaining TTL
    return None if reply == b"EN" else int(reply.split()[1][1:])


def test_two_caches_with_different_prefixes_never_see_each_others_keys(
    plain_app: Flask, memcached: Any
) -> None:
    a = backend_cache(plain_app, memcached, CACHE_KEY_PREFIX="app-a")
    b = backend_cache(plain_app, memcached, CACHE_KEY_PREFIX="app-b")
    same_as_a = backend_cache(plain_app, memcached, CACHE_KEY_PREFIX="app-a")
    assert a.set("k", "a's") and b.set("k", "b's")
    assert (a.get("k"), b.get("k"), same_as_a.get("k")) == ("a's", "b's", "a's")
    assert b.delete("k") and a.get("k") == "a's"
    assert b.delete_many("k") == ["k"] and a.has("k")
    # ... and the SWR layer's entries of the same prefix live apart from both.
    swr = Store(backend_of(a).store.pool, "app-a.swr", 1024 * 1024)
    assert swr.get("k") is MISS


@pytest.mark.private_memcached
def test_a_prefix_that_is_not_a_legal_namespace_is_hashed_not_refused(
    plain_app: Flask, memcached: Any
) -> None:
    odd = backend_cache(plain_app, memcached, CACHE_KEY_PREFIX="my app:")
    other = backend_cache(plain_app, memcached, CACHE_KEY_PREFIX="my app/")
    assert odd.set("k", 1) and other.set("k", 2)
    assert (odd.get("k"), other.get("k")) == (1, 2)
    mkey = memcached_key(f"{namespace_for('my app:')}.fc", "k")
    assert memcached.raw_get(mkey) == (b"1", 0)


@pytest.mark.private_memcached
def test_servers_and_options_come_from_the_flask_config(
    plain_app: Flask, memcached: Any, memcached_factory: Any
) -> None:
    other = memcached_factory()
    here = backend_cache(plain_app, memcached)
    there = backend_cache(plain_app, other, CACHE_OPTIONS={
        "pool_size": 3, "item_size_max": 4096, "timeout": 0.3})
    assert backend_of(here).store.pool is not backend_of(there).store.pool
    settings = backend_of(there).store.pool.settings
    assert (settings.servers, settings.pool_size, settings.timeout) == (
        (other.address,), 3, 0.3)
    before = int(memcached.stats()["curr_items"])
    assert there.set("big", "y" * 20_000) and there.get("big") == "y" * 20_000
    assert int(other.stats()["curr_items"]) > 2          # chunked at 4 KiB, on that server
    assert int(memcached.stats()["curr_items"]) == before


@pytest.mark.private_memcached
def test_the_default_timeout_comes_from_the_flask_config(plain_app: Flask,
                                                         memcached: Any) -> None:
    cache = backend_cache(plain_app, memcached, CACHE_DEFAULT_TIMEOUT=120)
    store = backend_of(cache).store
    cache.set("default", 1)
    cache.set("forever", 1, timeout=0)
    cache.set("month", 1, timeout=timedelta(days=31))      # sent as an absolute time
    ttl = ttl_in_memcached(memcached, store.key("default"))
    assert ttl is not None and 118 <= ttl <= 120
    assert ttl_in_memcached(memcached, store.key("forever")) == -1
    month = ttl_in_memcached(memcached, store.key("month"))
    assert month is not None and abs(month - 31 * 86400) < 5
    assert cache.get("month") == 1


def test_a_bad_flask_config_stops_init_app_naming_the_key(plain_app: Flask,
                                                          memcached: Any) -> None:
    with pytest.raises(ConfigError,
                       match=r"\[CACHE_OPTIONS\.pool_szie\] .*did you mean .pool_size."):
        backend_cache(plain_app, memcached, CACHE_OPTIONS={"pool_szie": 4})


def test_memoize_caches_outside_an_app_context(plain_app: Flask, memcached: Any) -> None:
    cache = backend_cache(plain_app, memcached)
    calls: list[int] = []

    @cache.memoize(timeout=60)
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    assert not has_app_context()
    assert [square(3), square(3)] == [9, 9]                  # a CLI, a script
    assert gevent.spawn(square, 3).get(timeout=5) == 9       # a worker greenlet
    with plain_app.app_context():
        assert square(3) == 9                                # and a view see one entry
    assert calls == [3]


@pytest.mark.private_memcached
def test_counters_are_bare_digits_that_memcached_itself_counts(plain_app: Flask,
                                                              memcached: Any) -> None:
    cache = backend_cache(plain_app, memcached)
    backend = backend_of(cache)
    mkey = backend.store.key("hits")
    assert backend.inc("hits") == 1 and cache.get("hits") == 1
    assert memcached.raw_get(mkey) == (b"1", 0)
    assert memcached.command_line(b"incr " + mkey + b" 9") == b"10"   # another client
    assert cache.get("hits") == 10
    # memcached's decr pads a shortened number with a space ("10" -> "9 ").
    assert memcached.command_line(b"decr " + mkey + b" 1") == b"9"
    assert memcached.raw_get(mkey) == (b"9 ", 0)
    assert cache.get("hits") == 9 and backend.inc("hits") == 10


def test_concurrent_inc_and_dec_count_exactly(plain_app: Flask, memcached: Any) -> None:
    backend = backend_of(backend_cache(plain_app, memcached))
    ups = [gevent.spawn(backend.inc, "up") for _ in range(50)]
    downs = [gevent.spawn(backend.dec, "down") for _ in range(20)]   # the gets/cas path
    gevent.joinall(ups + downs, raise_error=True)
    assert sorted(j.value for j in ups) == list(range(1, 51))
    assert sorted(j.value for j in downs) == list(range(-20, 0))
    assert (backend.get("up"), backend.get("down")) == (50, -20)


def test_inc_on_a_value_that_is_not_an_integer_is_none_and_logged(
    plain_app: Flask, memcached: Any, caplog: pytest.LogCaptureFixture
) -> None:
    backend = backend_of(backend_cache(plain_app, memcached))
    backend.set("name", "text")
    assert backend.inc("name") is None
    assert backend.get("name") == "text"
    assert "not an integer" in caplog.text


@pytest.mark.private_memcached
def test_a_negative_timeout_leaves_nothing_readable_in_memcached(
    plain_app: Flask, memcached: Any
) -> None:
    cache = backend_cache(plain_app, memcached, CACHE_OPTIONS={"item_size_max": 4096})
    store = backend_of(cache).store
    assert cache.set("k", "v") and cache.set("k", "v2", timeout=-1)
    assert memcached.raw_get(store.key("k")) is None
    before = int(memcached.stats()["total_items"])
    assert cache.set("big", "y" * 50_000, timeout=-1)
    assert int(memcached.stats()["total_items"]) == before + 1     # no chunks written
    assert cache.get("big") is None


def test_a_value_the_codec_refuses_is_not_cached_and_never_pickled(
    plain_app: Flask, memcached: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cache = backend_cache(plain_app, memcached)
    assert cache.set("obj", object()) is False
    assert cache.add("obj", collections.defaultdict(list)) is False  # would come back a dict
    assert cache.set_many({"ok": 1, "obj": object()}) == ["ok"]
    assert cache.get_many("ok", "obj") == [1, None]
    assert "cannot encode" in caplog.text


def test_clear_is_refused_and_says_why(plain_app: Flask, memcached: Any,
                                       caplog: pytest.LogCaptureFixture) -> None:
    cache = backend_cache(plain_app, memcached)
    assert cache.set("k", 1)
    assert cache.clear() is False
    assert cache.get("k") == 1
    assert "flush_all" in caplog.text and "CACHE_KEY_PREFIX" in caplog.text


@pytest.mark.private_memcached
def test_every_method_treats_memcached_down_as_a_miss(
    plain_app: Flask, memcached: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cache = backend_cache(plain_app, memcached, CACHE_OPTIONS={"timeout": 0.2})
    backend = backend_of(cache)
    errors_before = REGISTRY.get_sample_value("memcached_errors_total",
                                              {"kind": "connection"}) or 0.0
    memcached.stop()
    assert cache.get("k") is None and cache.has("k") is False
    assert cache.get_many("a", "b") == [None, None]
    assert cache.set("k", 1) is False and cache.add("k", 1) is False
    assert cache.set_many({"a": 1}) == []
    assert cache.delete("k") is False and cache.delete_many("a", "b") == []
    assert backend.inc("n") is None and backend.dec("n") is None
    assert backend.store.pool.in_use == 0
    # Each line says where and why by itself (an app without a logging config prints the
    # message alone), then the circuit opens.
    failed = [r.getMessage() for r in caplog.records if "memcached mg failed" in r.getMessage()]
    assert failed and all(f"on {memcached.address}: " in m for m in failed)
    assert all(not m.endswith(": ") and "()" not in m for m in failed)
    assert (REGISTRY.get_sample_value("memcached_errors_total", {"kind": "connection"})
            or 0.0) > errors_before
