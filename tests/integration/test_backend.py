"""Flask-Caching over pymemcache with the safe codec, against a real memcached."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify, request

from service import cache
from service.clients import get_pool
from service.keys import memcached_key
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
        assert cache.set_many({"c": b"\x00", "d": None}) == []
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
    prefix = get_settings_prefix(app)
    memcached.raw_set(memcached_key(prefix, "victim"), payload, flags=1)
    with app.app_context():
        assert cache.get("victim") is None
        assert cache.get_many("victim") == [None]
        assert cache.has("victim") is False
    assert not marker.exists()


def get_settings_prefix(app: Flask) -> str:
    with app.app_context():
        return str(cache.cache.store.prefix)


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
