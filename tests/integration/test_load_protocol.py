"""The load protocol on memcached's own claims, against real memcached: invalidations
stick whatever is in flight, every flight settles, a lost entry costs no wait, a lost
generation counter is never put back, clocks are never compared, and memcached is asked
few times per read.

Two app states on one memcached stand for two workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import pytest
from flask import Flask

from service.flask.state import state_of
from service.readpath.freshness import Windows
from service.readpath.loader import Job
from tests.conftest import settings_for

pytestmark = pytest.mark.memcached


def gated(origin: dict[str, Any], started: gevent.event.Event,
          gate: gevent.event.Event) -> Callable[[], Any]:
    def fetch() -> Any:
        seen = origin["data"]
        origin["calls"] = origin.get("calls", 0) + 1
        started.set()
        gate.wait(10)                                       # a slow origin
        return seen

    return fetch


def test_a_fetch_that_lands_after_an_invalidation_is_not_served(
        memcached: Any, make_app: Callable[..., Flask]) -> None:
    settings = settings_for([memcached.address])
    a, b = make_app(settings), make_app(settings)           # two workers, an L1 each
    sa, sb = state_of(a), state_of(b)
    origin: dict[str, Any] = {"data": "v1"}
    started, gate = gevent.event.Event(), gevent.event.Event()
    job = Job("k", gated(origin, started, gate), Windows(max_age=600), source="s")
    reader = gevent.spawn(sa.region.get_or_load, job)       # worker a: cold miss, fetching
    assert started.wait(5)
    origin["data"] = "v2"
    sb.region.invalidate("k")                               # worker b: the data changed
    late = gevent.spawn(sa.region.get_or_load, job)         # a reader of a, after it
    gate.set()
    assert reader.get(timeout=10).value == "v2"             # fetched again, not "v1"
    assert late.get(timeout=10).value == "v2"
    assert sb.region.get_or_load(job).value == "v2"
    assert sa.region.get_or_load(job).value == "v2"


def test_an_admin_delete_during_a_refresh_is_not_undone(
        memcached: Any, make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch,
        origin_server: Any) -> None:
    monkeypatch.setenv("SERVICE_ADMIN_TOKEN", "t")
    settings = settings_for([memcached.address], cache={"l1_ttl": 0.0}, sources={
        "slow": {"kind": "http", "url": origin_server.url + "/slow?delay=0.5",
                 "max_age": 600}})
    a, b = make_app(settings), make_app(settings)
    first = a.test_client().get("/v1/slow")
    assert first.headers["X-Cache"] == "MISS"
    # Worker a refreshes (the admin's button), worker b deletes while that fetch runs.
    refresh = a.test_client().post("/admin/api/sources/slow/refresh",
                                   headers={"Authorization": "Bearer t"})
    assert refresh.status_code in (200, 202)
    assert b.test_client().delete("/admin/api/sources/slow",
                                  headers={"Authorization": "Bearer t"}).status_code == 200
    assert state_of(a).refresher.join(timeout=10)
    after = b.test_client().get("/v1/slow")
    assert after.headers["X-Cache"] == "MISS"               # not the refresh's late value
    assert after.get_json()["n"] > first.get_json()["n"]


def test_a_cold_reader_does_not_hang_on_a_refresh_that_found_the_claim_held(
        memcached: Any, make_app: Callable[..., Flask],
        monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(settings_for([memcached.address], refresh={"lock_lease": 2}))
    st = state_of(app)
    job = Job("k", lambda: "mine", Windows(max_age=600), source="s")
    other = st.store.mget("k", vivify=3)                    # another worker's cold claim
    assert other.won
    look = st.tiers.look_shared
    entered = gevent.event.Event()

    def slow_look(key: str, vivify: float | None = None) -> Any:
        entered.set()
        gevent.sleep(0.2)                                   # a slow round trip, so the
        return look(key, vivify)                            # reader joins the flight

    monkeypatch.setattr(st.tiers, "look_shared", slow_look)
    with app.app_context():
        st.region.refresh_later(job)                        # admin's refresh, periodic...
    assert entered.wait(5)
    reader = gevent.spawn(st.region.get_or_load, job)       # a request for k meanwhile
    assert st.refresher.join(5)
    monkeypatch.undo()
    st.store.mdelete("k")                                   # the other worker gave up
    assert reader.get(timeout=10).value == "mine"           # settled: no hang


@pytest.mark.private_memcached
def test_a_worker_that_missed_a_bump_does_not_restore_the_old_generation(
        memcached_factory: Any, make_app: Callable[..., Flask], origin_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVICE_ADMIN_TOKEN", "t")
    servers = [memcached_factory(), memcached_factory()]
    settings = settings_for(
        [s.address for s in servers], cache={"l1_ttl": 0.0, "l1_max_entries": 0},
        sources={"items": {"kind": "http", "url": origin_server.url + "/items?id={id}",
                           "max_age": 600}})
    a, b = make_app(settings), make_app(settings)           # two workers
    before = {i: a.test_client().get(f"/v1/items?id={i}").data for i in range(16)}
    assert b.test_client().delete("/admin/api/sources/items",
                                  headers={"Authorization": "Bearer t"}).status_code == 200
    pool, store = state_of(a).pool, state_of(a).store
    gen_server = pool.server_for(store.child("gen").key("items"))
    next(s for s in servers if s.address == gen_server).restart()   # the counter is gone
    for _ in range(2):          # the first call meets the dead socket, the next reconnects
        after = {i: a.test_client().get(f"/v1/items?id={i}").data for i in range(16)}
    assert not [i for i in after if after[i] == before[i]]


@pytest.mark.private_memcached
def test_a_lost_entry_is_answered_stale_without_waiting(
        memcached: Any, make_app: Callable[..., Flask]) -> None:
    app = make_app(settings_for([memcached.address], cache={"l1_ttl": 0.0}))
    st = state_of(app)
    origin: dict[str, Any] = {"data": "v1"}
    started, gate = gevent.event.Event(), gevent.event.Event()
    gate.set()
    job = Job("k", gated(origin, started, gate), Windows(max_age=600), source="s")
    assert st.region.get_or_load(job).status == "MISS"
    memcached.restart()                                     # empty
    gate.clear()                                            # the origin is now slow
    origin["data"] = "v2"
    reads = [st.region.get_or_load(job) for _ in range(2)]  # dead socket, then answers
    # Answered at once from this worker's copy, while the refresh waits on the origin.
    assert {(r.status, r.value) for r in reads} == {("STALE", "v1")}
    assert not gate.is_set()
    gate.set()
    assert st.refresher.join(10)
    assert origin["calls"] == 2                             # one refresh, not one per read
    assert st.region.get_or_load(job).value == "v2"


def test_a_host_whose_clock_is_30s_off_answers_the_true_age(
        memcached: Any, make_app: Callable[..., Flask]) -> None:
    settings = settings_for([memcached.address], cache={"l1_ttl": 0.0})
    for skew in (30.0, -30.0):
        a = make_app(settings)
        b = make_app(settings, clock=lambda skew=skew: time.time() + skew)
        job = Job(f"k{skew}", lambda: "v", Windows(max_age=10), source="s")
        assert state_of(a).region.get_or_load(job).status == "MISS"
        seen = state_of(b).region.get_or_load(job)
        assert seen.status == "HIT", skew                   # fresh, whoever's clock
        assert seen.entry is not None
        assert seen.entry.timing.age(time.time() + skew) < 3, skew


def stats_total(memcached: Any) -> int:
    """Every command memcached counted: reads, writes, deletes, touches, arithmetic."""
    s = memcached.stats()
    # cmd_set counts every storage command, cas and meta sets included; cmd_get every key
    # read (meta gets included).
    return sum(int(s.get(k, 0)) for k in ("cmd_get", "cmd_set", "cmd_touch", "delete_hits",
                                          "delete_misses", "incr_hits", "incr_misses",
                                          "decr_hits", "decr_misses"))


@pytest.mark.private_memcached
def test_memcached_commands_per_cold_miss_stale_read_and_hit(
        memcached: Any, make_app: Callable[..., Flask]) -> None:
    from tests.conftest import FakeClock

    clock = FakeClock(time.time())
    app = make_app(settings_for([memcached.address], cache={"l1_ttl": 0.0},
                                refresh={"xfetch_beta": 0.0}), clock=clock)
    st = state_of(app)
    # The read path alone: not the admin's reporter, a periodic job of the same refresher
    # that writes what this worker saw into memcached now and then.
    del st.refresher._periodic[st.extra["history"].job]
    keys = [f"key{i}" for i in range(40)]
    jobs = [Job(k, lambda k=k: k, Windows(max_age=10, stale_while_revalidate=600),
                source="s") for k in keys]
    base = stats_total(memcached)
    for job in jobs:
        assert st.region.get_or_load(job).status == "MISS"
    cold = (stats_total(memcached) - base) / len(jobs)
    base = stats_total(memcached)
    for job in jobs:
        assert st.region.get_or_load(job).status == "HIT"
    hit = (stats_total(memcached) - base) / len(jobs)
    clock.advance(11)                                       # stale
    base = stats_total(memcached)
    for job in jobs:
        assert st.region.get_or_load(job).status == "STALE"
    assert st.refresher.join(10)
    stale = (stats_total(memcached) - base) / len(jobs)
    print(f"memcached commands per read: cold miss {cold:.2f}, stale read with its "
          f"refresh {stale:.2f}, hit past l1_ttl {hit:.2f}")
    assert cold <= 4 and stale <= 4 and hit <= 1
