"""The bounded memcached pool, checked out onto flask.g, against a real memcached."""

from __future__ import annotations

from typing import Any

import gevent
import gevent.event
import pytest
from flask import Flask, g

from service.clients import Connection, get_connection, get_pool
from service.errors import CacheUnavailable, PoolTimeout
from service.store import Store
from tests.conftest import settings_for

pytestmark = pytest.mark.memcached


def test_create_app_connects_nothing(app: Flask) -> None:
    assert app.extensions["service.clients"]["pool"] is None
    with app.test_request_context():
        assert "_memcached" not in g
    assert app.extensions["service.clients"]["pool"] is None


def test_request_checks_out_once_and_gives_back_at_teardown(app: Flask) -> None:
    @app.get("/twice")
    def twice() -> str:
        first = get_connection()
        assert get_connection() is first
        assert get_pool().in_use == 1
        return "ok"

    assert app.test_client().get("/twice").status_code == 200
    assert get_pool(app).in_use == 0


def test_connection_comes_back_when_the_view_raised(app: Flask) -> None:
    @app.get("/boom")
    def boom() -> str:
        get_connection()
        raise RuntimeError("view failed")

    client = app.test_client()
    for _ in range(10):  # more than pool_size=4: a leak would exhaust the pool
        assert client.get("/boom").status_code == 500
    pool = get_pool(app)
    assert pool.in_use == 0
    assert len(pool._idle) == 1


def test_fifty_greenlets_share_a_pool_of_four(app: Flask) -> None:
    peak = [0]

    def work(i: int) -> Any:
        with app.app_context():
            store = Store(app.extensions["service.clients"]["settings"], get_connection)
            store.set(f"k{i}", {"i": i})
            peak[0] = max(peak[0], get_pool().in_use)
            gevent.sleep(0)  # hold the connection across a switch
            return store.get(f"k{i}")

    jobs = [gevent.spawn(work, i) for i in range(50)]
    gevent.joinall(jobs, raise_error=True)
    assert [j.value for j in jobs] == [{"i": i} for i in range(50)]
    assert peak[0] == 4
    assert get_pool(app).in_use == 0


def test_a_full_pool_makes_callers_wait_then_serves_them(app: Flask) -> None:
    pool = get_pool(app)
    held = [pool.acquire() for _ in range(4)]
    waiter = gevent.spawn(pool.acquire)
    gevent.sleep(0)
    assert not waiter.ready()            # waiting, not failing
    pool.release(held.pop())
    conn = waiter.get(timeout=5)
    assert isinstance(conn, Connection)
    for c in [*held, conn]:
        pool.release(c)
    assert pool.in_use == 0


def test_a_full_pool_gives_up_after_pool_timeout(memcached: Any, make_app: Any) -> None:
    app = make_app(settings_for([memcached.address], cache={"pool_timeout": 0.05}))
    pool = get_pool(app)
    held = [pool.acquire() for _ in range(4)]
    with pytest.raises(PoolTimeout, match="pool_size=4"):
        pool.acquire()
    for c in held:
        pool.release(c)


@pytest.mark.private_memcached
def test_a_connection_whose_call_failed_is_discarded(memcached: Any, make_app: Any) -> None:
    app = make_app(settings_for([memcached.address], cache={"timeout": 0.2}))
    pool = get_pool(app)
    with app.app_context():
        conn = get_connection()
        store = Store(pool.settings, get_connection)
        store.set("a", 1)
        memcached.freeze()
        try:
            with pytest.raises(CacheUnavailable):
                store.get("a")
        finally:
            memcached.thaw()
        assert conn.broken
    assert pool.in_use == 0
    assert conn not in pool._idle        # closed and dropped, never handed back
    with app.app_context():
        fresh = get_connection()
        assert fresh is not conn
        assert Store(pool.settings, get_connection).get("a") == 1


def test_a_connection_is_not_shared_between_greenlets(app: Flask) -> None:
    with app.app_context():
        conn = get_connection()
        store = Store(get_pool().settings, lambda: conn)
        child = gevent.spawn(store.get, "x")
        with pytest.raises(RuntimeError, match="second greenlet"):
            child.get(timeout=5)


def test_greenlet_killed_mid_call_does_not_return_a_desynced_socket(app: Flask) -> None:
    pool = get_pool(app)
    started = gevent.event.Event()

    def slow_call() -> None:
        with pool.connection() as conn:
            store = Store(pool.settings, lambda: conn)
            store.set("big", "x" * 200_000)
            started.set()
            while True:
                store.get("big")

    job = gevent.spawn(slow_call)
    started.wait(timeout=5)
    gevent.sleep(0.01)
    job.kill(block=True, timeout=5)
    assert pool.in_use == 0
    assert pool._idle == []              # the interrupted connection was closed, not kept


def test_consistent_hashing_spreads_keys_over_servers(memcached_factory: Any,
                                                      make_app: Any) -> None:
    servers = [memcached_factory(), memcached_factory(), memcached_factory()]
    app = make_app(settings_for([s.address for s in servers]))
    with app.app_context():
        store = Store(get_pool().settings, get_connection)
        for i in range(300):
            store.set(f"key-{i}", i)
        assert store.get_many([f"key-{i}" for i in range(300)]) == {
            f"key-{i}": i for i in range(300)
        }
    counts = [int(s.stats()["curr_items"]) for s in servers]
    assert sum(counts) == 300
    assert min(counts) > 50              # rendezvous hashing: roughly a third each
