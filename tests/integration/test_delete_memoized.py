"""``delete_memoized(f)`` without arguments forgets every call of ``f``, as in
Flask-Caching, for ``@swr.memoize`` and for ``from service import Cache``; with
arguments, one call. Two apps on one memcached stand for two workers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from service import SWR
from service import Cache as DropInCache
from service.flask.state import build, state_of
from tests.conftest import FakeClock, settings_for, stop_app

pytestmark = pytest.mark.memcached

L1_TTL = 2.0  # the default: how long another worker may still answer from its copy


def decorated(memoize: Callable[..., Any], calls: Counter[str]) -> dict[str, Any]:
    """The same functions (same names, so same keys) for every app that calls this."""

    @memoize(timeout=60)
    def add(a: int, b: int) -> str:
        calls["add"] += 1
        return f"{a + b} #{calls['add']}"   # which computation answered

    @memoize(timeout=60)
    def double(a: int) -> int:
        calls["double"] += 1
        return 2 * a

    class Adder:
        def __init__(self, name: str) -> None:
            self.name = name

        def __repr__(self) -> str:      # the instance's part of the key, as in Flask-Caching
            return f"Adder({self.name})"

        @memoize(timeout=60)
        def plus(self, b: int) -> str:
            calls[f"plus {self.name}"] += 1
            return f"{self.name}+{b}"

    return {"add": add, "double": double, "Adder": Adder}


@pytest.fixture
def workers(memcached: Any, clock: FakeClock) -> Iterator[list[tuple[Flask, SWR, Counter[str],
                                                                     dict[str, Any]]]]:
    made = []
    for n in range(2):
        app = Flask(f"worker-{n}")
        swr = SWR()
        calls: Counter[str] = Counter()
        funcs = decorated(swr.memoize, calls)
        swr.init_app(app, settings_for([memcached.address]), clock=clock, monotonic=clock)
        made.append((app, swr, calls, funcs))
    yield made
    for app, *_ in made:
        stop_app(app)


def test_without_arguments_every_call_is_forgotten_in_every_worker(
        workers: list[Any], clock: FakeClock) -> None:
    (app, swr, calls, f), (other, _, other_calls, g) = workers
    with app.app_context():
        assert [f["add"](1, 2), f["add"](3, 4), f["double"](5)] == ["3 #1", "7 #2", 10]
    with other.app_context():
        assert [g["add"](1, 2), g["add"](3, 4)] == ["3 #1", "7 #2"]    # shared entries

    with app.app_context():
        swr.delete_memoized(f["add"])
        assert [f["add"](1, 2), f["add"](3, 4), f["double"](5)] == ["3 #3", "7 #4", 10]
    assert calls == Counter(add=4, double=1)       # every add call again; double untouched

    with other.app_context():                      # within l1_ttl: its own copies still
        assert [g["add"](1, 2), g["add"](3, 4)] == ["3 #1", "7 #2"]
    clock.advance(L1_TTL)                          # then it reads the new generation
    with other.app_context():
        assert [g["add"](1, 2), g["add"](3, 4)] == ["3 #3", "7 #4"]
    assert other_calls == Counter()                # and the first worker's new entries


def test_with_arguments_one_call_is_forgotten(workers: list[Any]) -> None:
    (app, swr, calls, f), _ = workers
    with app.app_context():
        f["add"](1, 2), f["add"](3, 4)
        swr.delete_memoized(f["add"], 1, b=2)      # normalised like the call itself
        f["add"](1, 2), f["add"](3, 4)
    assert calls["add"] == 3


def test_a_bound_method_names_its_instance(workers: list[Any]) -> None:
    (app, swr, calls, f), _ = workers
    ann, bob = f["Adder"]("ann"), f["Adder"]("bob")
    with app.app_context():
        assert [ann.plus(1), ann.plus(2), bob.plus(1)] == ["ann+1", "ann+2", "bob+1"]
        swr.delete_memoized(ann.plus, 1)           # ann's call with 1 only
        ann.plus(1), ann.plus(2), bob.plus(1)
        assert calls == Counter({"plus ann": 3, "plus bob": 1})
        swr.delete_memoized(ann.plus)              # every call of the method: more than
        ann.plus(1), ann.plus(2), bob.plus(1)      # Flask-Caching's ann-only, never less
        assert calls == Counter({"plus ann": 5, "plus bob": 2})


def test_an_undecorated_function_is_refused_by_name(workers: list[Any]) -> None:
    (app, swr, _, _), _ = workers

    def plain() -> int:
        return 1

    with app.app_context(), pytest.raises(TypeError, match="plain"):
        swr.delete_memoized(plain)


@pytest.fixture
def dropin(memcached: Any, key_prefix: str, clock: FakeClock
           ) -> Iterator[tuple[Flask, DropInCache, Counter[str], dict[str, Any]]]:
    app = Flask("dropin-delete")
    app.config.update(CACHE_TYPE="service.backend.MemcachedCache",
                      CACHE_MEMCACHED_SERVERS=[memcached.address], CACHE_KEY_PREFIX=key_prefix)
    cache = DropInCache()
    calls: Counter[str] = Counter()
    funcs = decorated(cache.memoize, calls)
    cache.init_app(app)
    build(app, state_of(app).settings, clock, clock)
    yield app, cache, calls, funcs
    stop_app(app)


def test_the_drop_in_forgets_every_call_like_flask_caching(dropin: Any) -> None:
    app, cache, calls, f = dropin
    with app.app_context():
        f["add"](1, 2), f["add"](3, 4), f["double"](5)
        cache.delete_memoized(f["add"])
        f["add"](1, 2), f["add"](3, 4), f["double"](5)
        assert calls == Counter(add=4, double=1)
        cache.delete_memoized_verhash(f["double"])  # Flask-Caching's other spelling
        f["add"](1, 2), f["double"](5)
        assert calls == Counter(add=4, double=2)
        cache.delete_memoized(f["double"], 5)
        f["double"](5)
        assert calls == Counter(add=4, double=3)
