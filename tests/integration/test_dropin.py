"""Issue 11: unchanged Flask-Caching code gets herd protection and stale-while-revalidate
by configuration only, in one process (the fleet-wide proof under gunicorn is in
test_dropin_gunicorn.py). Windows move on a fake clock; waits are on events."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import pytest
from flask import Flask
from flask_caching import Cache

from service.config import RefreshSettings
from service.flask.backend import MemcachedCache
from service.flask.coalesce import Coalescer
from service.observe import metrics
from tests.conftest import FakeClock

pytestmark = pytest.mark.memcached


@dataclass
class Origin:
    calls: int = 0
    fail: bool = False
    gate: gevent.event.Event | None = None
    entered: gevent.event.Event = field(default_factory=gevent.event.Event)

    def __call__(self) -> str:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        if self.fail:
            raise RuntimeError("the report failed")
        return f"report #{self.calls}"


@pytest.fixture
def unchanged(memcached: Any, key_prefix: str, clock: FakeClock
              ) -> Iterator[tuple[Flask, Origin, MemcachedCache]]:
    """A Flask-Caching app whose code knows nothing of this project: only its config."""
    app = Flask("unchanged")
    app.config.update(
        CACHE_TYPE="service.backend.MemcachedCache",
        CACHE_MEMCACHED_SERVERS=[memcached.address],
        CACHE_KEY_PREFIX=key_prefix,
        CACHE_STALE_WHILE_REVALIDATE=600,
        CACHE_STALE_IF_ERROR=3600,
    )
    cache = Cache(app)
    origin = Origin()

    @app.get("/report")
    @cache.cached(timeout=60)
    def report() -> str:
        return origin()

    backend: MemcachedCache = cache.cache
    # The same backend on a clock the test moves (windows), everything else as built.
    backend.herd = Coalescer(backend.store, RefreshSettings(lock_lease=5, error_ttl=5),
                             600, 3600, clock, clock)
    yield app, origin, backend


def get_all(app: Flask, n: int) -> list[gevent.Greenlet]:
    client = app.test_client()
    return [gevent.spawn(client.get, "/report") for _ in range(n)]


def bodies(jobs: list[gevent.Greenlet]) -> set[tuple[int, bytes]]:
    gevent.joinall(jobs, raise_error=True, timeout=20)
    return {(j.value.status_code, j.value.data) for j in jobs}


def test_concurrent_misses_make_one_recompute(unchanged: Any) -> None:
    app, origin, _backend = unchanged
    origin.gate = gevent.event.Event()
    jobs = get_all(app, 20)
    assert origin.entered.wait(timeout=5)
    origin.gate.set()
    assert bodies(jobs) == {(200, b"report #1")}
    assert origin.calls == 1                      # not one per waiting client


def test_stale_answers_at_once_while_exactly_one_caller_recomputes(
        unchanged: Any, clock: FakeClock) -> None:
    app, origin, _backend = unchanged
    app.test_client().get("/report")
    clock.advance(61)                             # past timeout, inside the SWR window
    origin.gate = gevent.event.Event()
    origin.entered.clear()
    recomputing = get_all(app, 1)
    assert origin.entered.wait(timeout=5)         # one caller is recomputing...
    others = get_all(app, 10)
    assert bodies(others) == {(200, b"report #1")}  # ...the others got the old one at once
    assert not recomputing[0].ready()
    origin.gate.set()
    assert bodies(recomputing) == {(200, b"report #2")}
    assert origin.calls == 2
    assert app.test_client().get("/report").data == b"report #2"


def test_a_stale_recompute_never_overwrites_a_value_that_landed_meanwhile(
        unchanged: Any, clock: FakeClock) -> None:
    # Another worker's recompute lands, and its lease is given back, between this read
    # seeing the stale entry and asking for the lease: this caller's own recompute is
    # fenced on the CAS of the entry it saw, so the newer value stays.
    app, origin, backend = unchanged
    app.test_client().get("/report")
    clock.advance(61)                             # past timeout, inside the SWR window
    herd = backend.herd
    acquire = herd.leases.acquire

    def the_other_worker_finishes_first(key: str, fence: Any) -> Any:
        herd.leases.acquire = acquire
        clock.advance(1)
        backend.set("view//report", "report from the other worker", timeout=60)
        return acquire(key, fence)

    herd.leases.acquire = the_other_worker_finishes_first  # type: ignore[method-assign]
    assert app.test_client().get("/report").data == b"report #2"   # its own recompute
    assert backend.get("view//report") == "report from the other worker"  # not stored
    assert herd.leases.holder("view//report") is None   # the lease went back at once


def test_a_failed_recompute_gives_the_lease_back_and_stale_if_error_serves(
        unchanged: Any, clock: FakeClock, memcached: Any) -> None:
    app, origin, backend = unchanged
    app.test_client().get("/report")
    clock.advance(60 + 600 + 1)                   # past SWR: usable only on error
    origin.fail = True
    app.testing = False
    assert app.test_client().get("/report").status_code == 500   # the recomputing caller
    # It stored nothing: its lease went back when its request ended, not after lock_lease.
    assert backend.herd.leases.holder("view//report") is None
    # The failure is remembered: the others get the old value instead of recomputing.
    assert {r.data for r in (app.test_client().get("/report") for _ in range(5))} == {
        b"report #1"}
    assert origin.calls == 2
    backend.herd.leases.leases.mdelete("view//report")  # as error_ttl running out would
    origin.fail = False
    assert app.test_client().get("/report").data == b"report #3"


def test_a_cold_recompute_that_raised_lets_the_next_caller_recompute(unchanged: Any) -> None:
    app, origin, backend = unchanged
    origin.fail = True
    app.testing = False
    assert app.test_client().get("/report").status_code == 500
    assert backend.herd.leases.holder("view//report") is None
    origin.fail = False
    assert app.test_client().get("/report").data == b"report #2"


def test_waiters_get_the_recomputed_value_across_caches_sharing_memcached(
        unchanged: Any, clock: FakeClock) -> None:
    # A second app (another worker or host) on the same memcached and prefix waits for
    # the first one's recompute instead of running its own.
    app, origin, _backend = unchanged
    other = Flask("other-worker")
    other.config.update(app.config)
    other_cache = Cache(other)
    other_backend: MemcachedCache = other_cache.cache
    other_backend.herd = Coalescer(other_backend.store, RefreshSettings(lock_lease=5),
                                   600, 3600, clock, clock)
    other_calls = []

    @other.get("/report")
    @other_cache.cached(timeout=60)
    def report() -> str:
        other_calls.append(1)
        return "computed by the other worker"

    origin.gate = gevent.event.Event()
    first = get_all(app, 1)
    assert origin.entered.wait(timeout=5)
    waited = metrics.lease_total.labels("waited")._value.get()
    waiting = [gevent.spawn(other.test_client().get, "/report") for _ in range(5)]
    with gevent.Timeout(5):                       # all five are polling for the holder
        while metrics.lease_total.labels("waited")._value.get() < waited + 5:
            gevent.sleep(0.001)
    assert not any(w.ready() for w in waiting)
    origin.gate.set()
    assert bodies(first) == {(200, b"report #1")}
    assert bodies(waiting) == {(200, b"report #1")}
    assert other_calls == []


def test_outside_an_app_context_a_miss_takes_no_lease(unchanged: Any) -> None:
    # A script or a scheduler's job that only looks (or whose recompute raises) has no
    # teardown to give a lease back: the workers must not wait out lock_lease for it.
    app, _origin, backend = unchanged
    assert backend.get("job-key") is None
    assert backend.herd.leases.holder("job-key") is None
    with app.app_context():                       # a request after it recomputes at once
        assert backend.get("job-key") is None
        assert backend.herd.leases.holder("job-key") is not None
        backend.set("job-key", "from the request", timeout=60)
    assert backend.herd.leases.holder("job-key") is None
    assert backend.get("job-key") == "from the request"


def test_outside_an_app_context_a_get_still_waits_for_the_holder(unchanged: Any) -> None:
    app, _origin, backend = unchanged
    ctx = app.app_context()
    ctx.push()
    try:
        assert backend.get("job-key") is None     # this request holds the lease
        waited = metrics.lease_total.labels("waited")._value.get()
        outside = gevent.spawn(backend.get, "job-key")   # a bare greenlet: no context
        with gevent.Timeout(5):
            while metrics.lease_total.labels("waited")._value.get() < waited + 1:
                gevent.sleep(0.001)
        assert not outside.ready()
        backend.set("job-key", "recomputed once", timeout=60)
    finally:
        ctx.pop()
    assert outside.get(timeout=5) == "recomputed once"


# -- from service import Cache: nobody waits for a refresh ---------------------------------


@pytest.fixture
def dropin(memcached: Any, key_prefix: str, clock: FakeClock) -> Iterator[Any]:
    from service import Cache as DropInCache
    from tests.conftest import stop_app

    app = Flask("dropin")
    app.config.update(CACHE_TYPE="service.backend.MemcachedCache",
                      CACHE_MEMCACHED_SERVERS=[memcached.address],
                      CACHE_KEY_PREFIX=key_prefix, CACHE_STALE_WHILE_REVALIDATE=600)
    cache = DropInCache()
    origin = Origin()
    calls: dict[str, int] = {"square": 0, "comments": 0}

    @app.get("/report")
    @cache.cached(timeout=60)
    def report() -> str:
        return origin()

    @cache.memoize(timeout=60, stale_if_error=3600)
    def square(x: int) -> int:
        calls["square"] += 1
        return x * x

    @cache.cached(timeout=60, key_prefix="all_comments")
    def comments() -> list[str]:
        calls["comments"] += 1
        return ["first"]

    cache.init_app(app)
    from service.flask.state import build, state_of

    # The same settings, on the test's clock: one injected clock for the whole read path.
    build(app, state_of(app).settings, clock, clock)
    yield app, cache, origin, calls, square, comments
    stop_app(app)


def test_the_drop_in_cache_answers_stale_at_once_and_refreshes_in_the_background(
        dropin: Any, clock: FakeClock) -> None:
    from service.flask.state import state_of

    app, _cache, origin, _calls, _square, _comments = dropin
    client = app.test_client()
    first = client.get("/report")
    assert (first.data, first.headers["X-Cache"]) == (b"report #1", "MISS")
    clock.advance(61)
    origin.gate = gevent.event.Event()
    origin.entered.clear()
    stale = [client.get("/report") for _ in range(5)]        # nobody waits, not even one
    assert {(r.data, r.headers["X-Cache"]) for r in stale} == {(b"report #1", "STALE")}
    assert origin.entered.wait(timeout=5)                     # the refresher is on it
    origin.gate.set()
    assert state_of(app).refresher.join(timeout=5)
    assert client.get("/report").data == b"report #2"
    assert origin.calls == 2


def test_the_drop_in_cache_keeps_flask_caching_keys_and_invalidation(dropin: Any) -> None:
    app, cache, origin, calls, square, comments = dropin
    client = app.test_client()
    assert client.get("/report?a=1").data == client.get("/report?a=2").data  # query_string=False
    with app.app_context():
        assert comments() == comments() == ["first"]
        cache.delete("all_comments")                 # Flask-Caching's way to invalidate
        assert comments() == ["first"] and calls["comments"] == 2
        assert square(3) == square(3) == 9 and calls["square"] == 1
        cache.delete_memoized(square, 3)
        assert square(3) == 9 and calls["square"] == 2
        cache.delete("view//report")
    assert client.get("/report").data == b"report #2"
    assert origin.calls == 2


def test_lock_lease_is_a_cache_option(memcached: Any, key_prefix: str) -> None:
    app = Flask("lease-option")
    app.config.update(CACHE_TYPE="service.backend.MemcachedCache",
                      CACHE_MEMCACHED_SERVERS=[memcached.address],
                      CACHE_KEY_PREFIX=key_prefix, CACHE_OPTIONS={"lock_lease": 7})
    cache = Cache(app)
    assert cache.cache.herd.lock_lease == 7


def test_a_recompute_slower_than_its_lease_is_renewed_not_repeated(
        memcached: Any, key_prefix: str) -> None:
    app = Flask("slow-recompute")
    app.config.update(CACHE_TYPE="service.backend.MemcachedCache",
                      CACHE_MEMCACHED_SERVERS=[memcached.address],
                      CACHE_KEY_PREFIX=key_prefix, CACHE_OPTIONS={"lock_lease": 1})
    cache = Cache(app)
    origin = Origin()
    origin.gate = gevent.event.Event()

    @app.get("/slow")
    @cache.cached(timeout=60)
    def slow() -> str:
        return origin()

    holder = gevent.spawn(app.test_client().get, "/slow")
    assert origin.entered.wait(timeout=5)
    # The claim's item lives 2 s (a 1 s lease plus memcached's whole-second tick); the
    # recompute takes longer. Renewed by its live holder, nobody else recomputes.
    waiter = gevent.spawn(app.test_client().get, "/slow")
    gevent.sleep(3)                                  # the scenario: a slow view
    origin.gate.set()
    assert bodies([holder, waiter]) == {(200, b"report #1")}
    assert origin.calls == 1


def test_a_nested_app_context_does_not_give_the_outer_claim_back(
        memcached: Any, key_prefix: str) -> None:
    app = Flask("nested")
    app.config.update(CACHE_TYPE="service.backend.MemcachedCache",
                      CACHE_MEMCACHED_SERVERS=[memcached.address],
                      CACHE_KEY_PREFIX=key_prefix)
    cache = Cache(app)
    origin = Origin()
    origin.gate = gevent.event.Event()
    nested_done = gevent.event.Event()

    @app.get("/nested")
    @cache.cached(timeout=60)
    def nested() -> str:
        with app.app_context():                      # its teardown must not touch ours
            pass
        nested_done.set()
        return origin()

    holder = gevent.spawn(app.test_client().get, "/nested")
    assert origin.entered.wait(timeout=5) and nested_done.is_set()
    # Had the nested teardown given the claim back, the waiter would recompute (and
    # count a second origin call) instead of waiting for the holder.
    waiter = gevent.spawn(app.test_client().get, "/nested")
    origin.gate.set()
    assert bodies([holder, waiter]) == {(200, b"report #1")}
    assert origin.calls == 1
