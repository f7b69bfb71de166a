"""Stale-while-revalidate reads in one worker, against a real memcached.

Window transitions use a fake clock (moved by hand), so no test sleeps to make an entry
stale; background work is awaited through the refresher's own join.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import pytest
from flask import Flask

from service.errors import OriginError, OriginTimeout
from service.flask.state import AppState, state_of
from service.readpath.freshness import Windows
from service.readpath.loader import Job
from tests.conftest import FakeClock, settings_for

pytestmark = pytest.mark.memcached
W = Windows(max_age=60, stale_while_revalidate=600, stale_if_error=3600)


class Origin:
    """A fetch function that counts its calls and can be told to fail or block."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail: Exception | None = None
        self.gate: gevent.event.Event | None = None
        self.callers: list[Any] = []
        self.entered = gevent.event.Event()

    def __call__(self) -> dict[str, int]:
        self.calls += 1
        self.callers.append(gevent.getcurrent())
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return {"version": self.calls}


@pytest.fixture
def swr_app(memcached: Any, make_app: Callable[..., Flask], clock: FakeClock) -> Flask:
    app = make_app(settings_for([memcached.address], refresh={"xfetch_beta": 0.0,
                                                              "fetch_timeout": 2.0}),
                   clock=clock)
    state_of(app).pool.monotonic = clock          # the circuit breakers' cool-down too
    return app


def swr(app: Flask) -> AppState:
    return state_of(app)


def read(app: Flask, origin: Origin, key: str = "k") -> Any:
    with app.app_context():
        return state_of(app).region.get_or_load(Job(key, origin, W, source="test"))


def settle(app: Flask, key: str = "k") -> None:
    assert swr(app).refresher.wait(key, timeout=10)


def test_miss_then_hit_then_stale_with_one_background_refresh(swr_app: Flask,
                                                              clock: FakeClock) -> None:
    origin = Origin()
    first = read(swr_app, origin)
    assert (first.status, first.value, origin.calls) == ("MISS", {"version": 1}, 1)
    assert read(swr_app, origin).status == "HIT"
    clock.advance(61)
    stale = [read(swr_app, origin) for _ in range(5)]
    assert {r.status for r in stale} == {"STALE"}
    assert {r.value["version"] for r in stale} == {1}      # answered at once, old value
    settle(swr_app)
    assert origin.calls == 2                               # one refresh for five reads
    after = read(swr_app, origin)
    assert (after.status, after.value) == ("HIT", {"version": 2})


def test_stale_reads_never_run_the_fetch_in_the_reader(swr_app: Flask,
                                                       clock: FakeClock) -> None:
    origin = Origin()
    read(swr_app, origin)
    clock.advance(100)
    origin.gate = gevent.event.Event()                     # the refresh will hang
    results = [read(swr_app, origin) for _ in range(20)]
    assert {r.status for r in results} == {"STALE"}        # nobody waited for it
    origin.entered.clear()
    assert origin.entered.wait(timeout=5)                  # the refresh is under way
    assert origin.calls == 2
    assert origin.callers[-1] is not gevent.getcurrent()
    origin.gate.set()
    settle(swr_app)


def test_failing_refresh_keeps_serving_within_stale_if_error(swr_app: Flask,
                                                             clock: FakeClock) -> None:
    origin = Origin()
    read(swr_app, origin)
    origin.fail = RuntimeError("upstream down")
    clock.advance(61)
    assert read(swr_app, origin).status == "STALE"
    settle(swr_app)
    assert swr(swr_app).refresher.failures("k") == 1
    clock.advance(700)                                    # past swr: usable only on error
    on_error = read(swr_app, origin)
    assert (on_error.status, on_error.value) == ("STALE", {"version": 1})
    clock.advance(3600)                                   # past stale_if_error: gone
    with pytest.raises(OriginError, match="upstream down"):
        read(swr_app, origin)


def test_error_only_entry_is_replaced_when_the_fetch_succeeds(swr_app: Flask,
                                                              clock: FakeClock) -> None:
    origin = Origin()
    read(swr_app, origin)
    clock.advance(700)
    result = read(swr_app, origin)
    assert (result.status, result.value) == ("MISS", {"version": 2})


def test_failed_cold_fetch_is_remembered_briefly(swr_app: Flask, clock: FakeClock) -> None:
    origin = Origin()
    origin.fail = RuntimeError("boom")
    with pytest.raises(OriginError):
        read(swr_app, origin)
    with pytest.raises(OriginError, match="remembered"):
        read(swr_app, origin)
    assert origin.calls == 1                     # the failing origin was not hit again
    with swr_app.app_context():
        swr(swr_app).tiers.store.delete("k")   # the record, as error_ttl expiring would
    origin.fail = None
    assert read(swr_app, origin).status == "MISS"


def test_a_fetch_over_fetch_timeout_is_a_504(swr_app: Flask) -> None:
    origin = Origin()
    origin.gate = gevent.event.Event()           # never set: the fetch hangs
    with pytest.raises(OriginTimeout, match="no answer within 2s"):
        read(swr_app, origin)
    origin.gate.set()


def test_fifty_greenlets_on_a_cold_key_make_one_fetch(swr_app: Flask) -> None:
    origin = Origin()
    origin.gate = gevent.event.Event()
    readers = [gevent.spawn(read, swr_app, origin) for _ in range(50)]
    gevent.sleep(0)
    origin.gate.set()
    gevent.joinall(readers, raise_error=True)
    assert origin.calls == 1
    assert {r.value.value["version"] for r in readers} == {1}


@pytest.mark.private_memcached
def test_memcached_down_serves_the_local_copy_and_fetches_without_a_lease(
    swr_app: Flask, memcached: Any, clock: FakeClock
) -> None:
    origin = Origin()
    read(swr_app, origin)
    memcached.stop()
    clock.advance(30)                             # past l1_ttl: memcached would be asked
    assert read(swr_app, origin).status == "HIT"  # ...it is down; the local copy answers
    clock.advance(40)
    assert read(swr_app, origin).status == "STALE"
    settle(swr_app)
    assert origin.calls == 2                      # the refresh ran without fleet lease
    cold = read(swr_app, origin, "other")
    assert cold.status == "MISS"
    memcached.restart()
    clock.advance(30)                             # past l1_ttl and the circuit's cool-down
    again = read(swr_app, origin, "other")
    # memcached is back, and empty: this worker's copy is answered at once (a lost entry
    # costs no wait) and refreshed in the background, into memcached again.
    assert again.status == "STALE"
    settle(swr_app, "other")
    with swr_app.app_context():
        assert swr(swr_app).tiers.read_shared("other") is not None


def test_a_holder_that_lost_its_lease_cannot_overwrite_a_newer_value(
    swr_app: Flask, memcached: Any
) -> None:
    cache = swr(swr_app)
    slow = Origin()
    slow.gate = gevent.event.Event()
    holder = gevent.spawn(read, swr_app, slow)
    assert slow.entered.wait(timeout=5)           # the holder is inside its fetch
    with swr_app.app_context():
        # The claim's item vanishes (evicted, or its server restarted): another worker
        # wins the key, fetches and stores a newer value.
        cache.tiers.store.mdelete("k")
        other = cache.tiers.look_shared("k", 5).claim
        assert other is not None
        fast_entry = cache.loader._fetch_and_store(
            Job("k", lambda: {"version": "newer"}, W, source="test"), other,
            background=False)
    slow.gate.set()                               # the old holder finishes late
    holder.get(timeout=10)
    with swr_app.app_context():
        found = cache.tiers.read_shared("k")
    assert found is not None
    assert found.entry.value == {"version": "newer"} == fast_entry.value


def test_refreshes_of_a_failing_key_back_off(swr_app: Flask, clock: FakeClock) -> None:
    origin = Origin()
    read(swr_app, origin)
    origin.fail = RuntimeError("still down")
    cache = swr(swr_app)
    clock.advance(61)
    read(swr_app, origin)
    settle(swr_app)
    calls = origin.calls
    for _ in range(10):
        read(swr_app, origin)                     # within the back-off: no new refresh
    assert origin.calls == calls
    clock.advance(2.1)                            # the first back-off is at most 1 s
    read(swr_app, origin)
    settle(swr_app)
    assert origin.calls == calls + 1
    assert cache.refresher.failures("k") == 2


def test_refresher_drains_on_stop(swr_app: Flask, clock: FakeClock) -> None:
    origin = Origin()
    read(swr_app, origin)
    clock.advance(61)
    origin.gate = gevent.event.Event()
    read(swr_app, origin)
    assert swr(swr_app).refresher.is_running("k")
    gevent.spawn_later(0.05, origin.gate.set)     # finishes during the drain
    assert swr(swr_app).refresher.stop(timeout=5) == 0
    with swr_app.app_context():
        found = swr(swr_app).tiers.read_shared("k")
    assert found is not None and found.entry.value == {"version": 2}


def test_refresher_kills_what_does_not_finish_and_releases_its_lease(
    swr_app: Flask, clock: FakeClock
) -> None:
    origin = Origin()
    read(swr_app, origin)
    clock.advance(61)
    origin.gate = gevent.event.Event()            # never set
    read(swr_app, origin)
    assert swr(swr_app).refresher.stop(timeout=0.1) == 1
    with swr_app.app_context():
        assert swr(swr_app).leases.holder("k") is None
    origin.gate.set()
