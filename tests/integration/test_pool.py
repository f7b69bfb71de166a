"""The bounded memcached pool against a real memcached: a Store borrows a connection for
each operation (no app context needed), and a request's own connection lives on flask.g."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.event
import pytest
from flask import Flask, g

from service.config import CacheSettings
from service.errors import CacheUnavailable, PoolTimeout
from service.memcache.clients import (
    ClientPool,
    Connection,
    borrow,
    close_pools,
    get_connection,
    get_pool,
    pool_for,
)
from service.memcache.store import Store
from tests.conftest import settings_for

pytestmark = pytest.mark.memcached


@pytest.fixture(autouse=True)
def _fresh_pools() -> Iterator[None]:
    close_pools()
    yield
    close_pools()


def cache_settings(memcached: Any, **cache: Any) -> CacheSettings:
    return settings_for([memcached.address], cache=cache).cache


def store_for(settings: CacheSettings, namespace: str = "pool-test") -> Store:
    return Store(pool_for(settings), namespace, settings.item_size_max)


@pytest.mark.private_memcached
def test_create_app_connects_nothing(memcached: Any, make_app: Any) -> None:
    before = int(memcached.stats()["total_connections"])
    app = make_app(settings_for([memcached.address]))
    with app.test_request_context():
        assert "_memcached" not in g
    pool = get_pool(app)
    assert (pool.in_use, pool._idle) == (0, [])
    # Only our own stats probe connected meanwhile.
    assert int(memcached.stats()["total_connections"]) == before + 1


def test_a_store_needs_no_app_context_and_holds_nothing_between_calls(memcached: Any) -> None:
    settings = cache_settings(memcached)
    store = store_for(settings)
    assert store.set("k", {"v": 1})
    assert store.get("k") == {"v": 1}
    pool = pool_for(settings)
    assert pool.in_use == 0
    assert len(pool._idle) == 1          # one socket, reused by each call in turn


def test_users_configured_alike_share_one_pool(memcached: Any, memcached_factory: Any) -> None:
    a = cache_settings(memcached)
    assert pool_for(a) is pool_for(settings_for([memcached.address]).cache)
    # The namespace and the in-process tier do not matter to the pool ...
    assert pool_for(a) is pool_for(cache_settings(memcached, key_prefix="other",
                                                  l1_ttl=9.0))
    # ... the servers and the connection settings do.
    other = memcached_factory()
    assert pool_for(a) is not pool_for(settings_for([other.address]).cache)
    assert pool_for(a) is not pool_for(cache_settings(memcached, pool_size=5))


def test_a_closed_pool_is_replaced_but_keeps_serving_its_stores(memcached: Any) -> None:
    settings = cache_settings(memcached)
    store = store_for(settings)
    old = pool_for(settings)
    old.close()
    assert pool_for(settings) is not old
    assert store.set("k", 1) and store.get("k") == 1
    assert old._idle == []               # a closed pool keeps no socket


def test_fifty_greenlets_share_a_pool_of_four(memcached: Any) -> None:
    settings = cache_settings(memcached)
    store = store_for(settings)
    pool = pool_for(settings)
    peak = [0]

    def work(i: int) -> Any:
        with borrow(pool) as conn:
            peak[0] = max(peak[0], pool.in_use)
            gevent.sleep(0)  # hold the connection across a switch
            assert conn.owner is gevent.getcurrent()
        store.set(f"k{i}", {"i": i})
        return store.get(f"k{i}")

    jobs = [gevent.spawn(work, i) for i in range(50)]
    gevent.joinall(jobs, raise_error=True)
    assert [j.value for j in jobs] == [{"i": i} for i in range(50)]
    assert peak[0] == 4
    assert pool.in_use == 0


def test_a_full_pool_makes_callers_wait_then_serves_them(memcached: Any) -> None:
    pool = pool_for(cache_settings(memcached))
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


def test_a_full_pool_gives_up_after_pool_timeout(memcached: Any) -> None:
    settings = cache_settings(memcached, pool_timeout=0.05)
    pool = pool_for(settings)
    held = [pool.acquire() for _ in range(4)]
    with pytest.raises(PoolTimeout, match="pool_size=4"):
        store_for(settings).get("k")
    for c in held:
        pool.release(c)


@pytest.mark.private_memcached
def test_a_connection_whose_call_failed_is_discarded(memcached: Any) -> None:
    settings = cache_settings(memcached, timeout=0.2)
    store = store_for(settings)
    pool = pool_for(settings)
    store.set("a", 1)
    (idle,) = pool._idle
    memcached.freeze()
    try:
        with pytest.raises(CacheUnavailable):
            store.get("a")
    finally:
        memcached.thaw()
    assert idle.broken
    assert pool.in_use == 0
    assert pool._idle == []              # closed and dropped, never handed back
    assert store.get("a") == 1           # a new connection, once the circuit lets us


def test_greenlet_killed_mid_call_does_not_return_a_desynced_socket(memcached: Any) -> None:
    settings = cache_settings(memcached)
    store = store_for(settings)
    pool = pool_for(settings)
    started = gevent.event.Event()

    def slow_calls() -> None:
        store.set("big", "x" * 200_000)
        started.set()
        while True:
            store.get("big")

    job = gevent.spawn(slow_calls)
    started.wait(timeout=5)
    gevent.sleep(0.01)
    job.kill(block=True, timeout=5)
    assert pool.in_use == 0
    assert pool._idle == []              # the interrupted connection was closed, not kept
    assert store.get("big") == "x" * 200_000


def test_a_forked_child_never_uses_its_parents_sockets(memcached: Any) -> None:
    settings = cache_settings(memcached)
    store = store_for(settings)
    pool = pool_for(settings)
    store.set("k", "parent")
    (parent_conn,) = pool._idle
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status, never return into pytest
        ok = False
        try:
            ok = (store.get("k") == "parent" and pool.generation == 1
                  and parent_conn not in pool._idle and pool_for(settings) is pool
                  and pool.in_use == 0 and len(pool._idle) == 1)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    # The parent's socket still works: the child closed only its own copy.
    assert pool._idle == [parent_conn] and store.get("k") == "parent"


def test_consistent_hashing_spreads_keys_over_servers(memcached_factory: Any) -> None:
    servers = [memcached_factory(), memcached_factory(), memcached_factory()]
    settings = settings_for([s.address for s in servers]).cache
    store = store_for(settings)
    for i in range(300):
        store.set(f"key-{i}", i)
    assert store.get_many([f"key-{i}" for i in range(300)]) == {
        f"key-{i}": i for i in range(300)
    }
    counts = [int(s.stats()["curr_items"]) for s in servers]
    assert sum(counts) == 300
    assert min(counts) > 50              # rendezvous hashing: roughly a third each


# -- the per-request connection on flask.g, for a user's own views (SPEC §5) ---------------


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


@pytest.mark.private_memcached
def test_a_request_connection_that_broke_is_discarded(memcached: Any, make_app: Any) -> None:
    app = make_app(settings_for([memcached.address], cache={"timeout": 0.2}))
    pool: ClientPool = get_pool(app)
    with app.app_context():
        conn = get_connection()
        memcached.freeze()
        try:
            with pytest.raises(CacheUnavailable):
                conn.call(memcached.address, "get", lambda c: c.get(b"a"))
        finally:
            memcached.thaw()
        assert conn.broken
    assert pool.in_use == 0
    assert conn not in pool._idle


def test_a_request_connection_is_not_shared_between_greenlets(app: Flask,
                                                              memcached: Any) -> None:
    with app.app_context():
        conn = get_connection()
        child = gevent.spawn(conn.call, memcached.address, "get", lambda c: c.get(b"x"))
        with pytest.raises(RuntimeError, match="second greenlet"):
            child.get(timeout=5)
