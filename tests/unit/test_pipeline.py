"""The whole read pipeline (region, loader, tiers, leases, negative caching, refresher)
over an in-memory store and a fake clock: every lease, waiter, refresh and fencing
decision. memcached itself is proven in tests/integration."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import pytest
from flask import Flask

from service.config import RefreshSettings
from service.entry import Entry
from service.errors import OriginError
from service.freshness import Windows
from service.lease import Leases, lease_key, lease_value
from service.ledger import Ledger
from service.loader import UNCACHEABLE, Job, Loader
from service.negative import ErrorMemo, error_key
from service.refresher import Refresher
from service.region import Region
from service.state import in_app_context
from service.tiers import LocalTier, TwoTier, forgotten_key
from tests.conftest import FakeClock
from tests.memstore import MemoryStore

WINDOWS = Windows(max_age=10, stale_while_revalidate=20, stale_if_error=30)


@dataclass
class Pipeline:
    clock: FakeClock
    store: MemoryStore
    tiers: TwoTier
    loader: Loader
    region: Region
    refresher: Refresher
    ledger: Ledger
    calls: list[str] = field(default_factory=list)

    def job(self, key: str = "k", value: Any = "v", fail: Exception | None = None,
            gate: gevent.event.Event | None = None, **kw: Any) -> Job:
        def fetch() -> Any:
            self.calls.append(key)
            if gate is not None:
                gate.wait()
            if fail is not None:
                raise fail
            return value
        return Job(key, fetch, WINDOWS, source="src", **kw)

    def store_entry(self, key: str, value: Any, stored_at: float) -> Entry:
        entry = Entry.create(value, stored_at, WINDOWS, 0.0)
        self.store.set(key, entry.to_wire(), 100)
        return entry


@pytest.fixture
def pipe() -> Iterator[Pipeline]:
    clock = FakeClock()
    store = MemoryStore(clock)
    app = Flask("pipeline")
    settings = RefreshSettings(lock_lease=5.0, fetch_timeout=5.0, error_ttl=5.0,
                               xfetch_beta=0.0)
    tiers = TwoTier(store, LocalTier(100), 2.0, clock)  # type: ignore[arg-type]
    ledger = Ledger(100)
    loader = Loader(tiers, Leases(store, 5.0), ErrorMemo(store, 5.0, clock),  # type: ignore[arg-type]
                    settings, in_app_context(app), clock, clock, observer=ledger)
    refresher = Refresher(app, 4, 60.0, clock)
    region = Region(tiers, loader, refresher, ledger, clock, 0.0)
    yield Pipeline(clock, store, tiers, loader, region, refresher, ledger)
    refresher.stop(timeout=2)


def spawn_readers(n: int, read: Callable[[], Any]) -> list[gevent.Greenlet]:
    return [gevent.spawn(read) for _ in range(n)]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Yield to other greenlets until ``predicate`` holds (they run on real sockets or
    real timers; this awaits their progress, it asserts nothing about time)."""
    with gevent.Timeout(timeout):
        while not predicate():
            gevent.sleep(0.001)


# -- the cold path ------------------------------------------------------------------------

def test_a_cold_read_loads_once_and_the_next_read_is_a_hit(pipe: Pipeline) -> None:
    first = pipe.region.get_or_load(pipe.job(value={"n": 1}))
    second = pipe.region.get_or_load(pipe.job(value={"n": 2}))
    assert (first.status, first.value) == ("MISS", {"n": 1})
    assert (second.status, second.value) == ("HIT", {"n": 1})
    assert pipe.calls == ["k"]
    assert lease_key("k") not in pipe.store.items  # released after the write


def test_concurrent_cold_reads_of_one_worker_share_one_fetch(pipe: Pipeline) -> None:
    gate = gevent.event.Event()
    readers = spawn_readers(20, lambda: pipe.region.get_or_load(pipe.job(gate=gate)))
    wait_until(lambda: pipe.calls == ["k"])
    gate.set()
    gevent.joinall(readers, raise_error=True)
    assert pipe.calls == ["k"]
    assert {r.value.value for r in readers} == {"v"}


def test_followers_get_their_own_copy_of_a_mutable_value(pipe: Pipeline) -> None:
    gate = gevent.event.Event()
    readers = spawn_readers(2, lambda: pipe.region.get_or_load(
        pipe.job(value={"list": [1]}, gate=gate)))
    wait_until(lambda: pipe.calls == ["k"])
    gate.set()
    gevent.joinall(readers, raise_error=True)
    a, b = (r.value.value for r in readers)
    assert a == b and a is not b


def test_a_waiter_gets_the_holders_value_without_fetching(pipe: Pipeline) -> None:
    pipe.store.add(lease_key("k"), lease_value("another-worker", time.time() + 5), 5)
    reader = gevent.spawn(pipe.region.get_or_load, pipe.job())
    wait_until(lambda: "get_many" in pipe.store.calls)  # it is polling
    pipe.store_entry("k", "theirs", pipe.clock())
    pipe.store.delete(lease_key("k"))
    result = reader.get(timeout=5)
    assert (result.status, result.value) == ("MISS", "theirs")
    assert pipe.calls == []


def test_a_waiter_raises_the_holders_remembered_error_instead_of_fetching(
        pipe: Pipeline) -> None:
    pipe.store.add(lease_key("k"), lease_value("another-worker", time.time() + 5), 5)
    reader = gevent.spawn(pipe.region.get_or_load, pipe.job())
    wait_until(lambda: "get_many" in pipe.store.calls)
    pipe.store.set(error_key("k"), {"status": 502, "detail": "origin said 500",
                                    "until": pipe.clock() + 5}, 5)
    pipe.store.delete(lease_key("k"))
    with pytest.raises(OriginError, match="origin said 500"):
        reader.get(timeout=5)
    assert pipe.calls == []


def test_a_waiter_takes_over_when_the_lease_lapses_with_nothing_stored(pipe: Pipeline) -> None:
    pipe.store.add(lease_key("k"), lease_value("a-worker-that-died", time.time() + 5), 5)
    reader = gevent.spawn(pipe.region.get_or_load, pipe.job(value="mine"))
    wait_until(lambda: "get_many" in pipe.store.calls)
    pipe.clock.advance(6)  # the dead holder's lease expires
    result = reader.get(timeout=5)
    assert (result.status, result.value) == ("MISS", "mine")
    assert pipe.calls == ["k"]


def test_a_remembered_error_answers_cold_reads_without_fetching(pipe: Pipeline) -> None:
    with pytest.raises(OriginError):
        pipe.region.get_or_load(pipe.job(fail=OriginError("boom")))
    with pytest.raises(OriginError, match="remembered"):
        pipe.region.get_or_load(pipe.job())
    assert pipe.calls == ["k"]
    pipe.clock.advance(6)  # error_ttl passed
    assert pipe.region.get_or_load(pipe.job()).value == "v"


def test_the_lease_is_rechecked_after_taking_it(pipe: Pipeline) -> None:
    # The entry landed between our miss and our lease (dogpile's rule): no fetch.
    pipe.store_entry("k", "landed", pipe.clock())
    loaded = pipe.loader.load(pipe.job(), pipe.region.servable)
    assert loaded.value == "landed" and pipe.calls == []


# -- stale, stale-if-error, gone ---------------------------------------------------------------

def test_a_stale_read_answers_at_once_and_one_background_refresh_runs(pipe: Pipeline) -> None:
    pipe.store_entry("k", "old", pipe.clock())
    pipe.clock.advance(15)  # stale
    results = [pipe.region.get_or_load(pipe.job(value="new")) for _ in range(5)]
    assert {(r.status, r.value) for r in results} == {("STALE", "old")}
    assert pipe.refresher.join(timeout=5)
    assert pipe.calls == ["k"]
    assert pipe.region.get_or_load(pipe.job()).value == "new"


def test_a_background_refresh_skips_when_a_newer_entry_landed(pipe: Pipeline) -> None:
    seen = pipe.clock()
    pipe.clock.advance(15)
    pipe.store_entry("k", "refreshed-by-another-worker", pipe.clock())
    assert pipe.loader.refresh(pipe.job(), pipe.region.newer_than(seen)) is None
    assert pipe.calls == []
    # The same refresh, when nothing newer landed, does fetch.
    assert pipe.loader.refresh(pipe.job(value="x"), pipe.region.newer_than(pipe.clock())) \
        is not None
    assert pipe.calls == ["k"]


def test_a_background_refresh_leaves_it_to_the_lease_holder(pipe: Pipeline) -> None:
    pipe.store.add(lease_key("k"), lease_value("another-worker", time.time() + 5), 5)
    assert pipe.loader.refresh(pipe.job(), pipe.region.never) is None
    assert pipe.calls == []


def test_stale_if_error_serves_the_old_copy_when_the_fetch_fails(pipe: Pipeline) -> None:
    pipe.store_entry("k", "old", pipe.clock())
    pipe.clock.advance(35)  # past stale_while_revalidate, inside stale_if_error
    result = pipe.region.get_or_load(pipe.job(fail=OriginError("down")))
    assert (result.status, result.value) == ("STALE", "old")
    pipe.clock.advance(30)  # gone
    with pytest.raises(OriginError):
        pipe.region.get_or_load(pipe.job(fail=OriginError("down")))


def test_a_fetch_after_a_lapsed_lease_is_fenced_and_keeps_the_newer_entry(
        pipe: Pipeline) -> None:
    gate = gevent.event.Event()
    reader = gevent.spawn(pipe.region.get_or_load, pipe.job(value="slow", gate=gate))
    wait_until(lambda: pipe.calls == ["k"])
    # Our lease lapses; another worker stores a newer entry meanwhile.
    pipe.store.delete(lease_key("k"))
    pipe.store_entry("k", "newer", pipe.clock())
    gate.set()
    assert reader.get(timeout=5).value == "slow"  # our caller gets what we fetched
    raw, _ = pipe.store.gets("k")
    assert Entry.from_wire(raw).value == "newer"  # but memcached keeps the newer one


# -- the local tier and invalidation ---------------------------------------------------------

def test_a_local_copy_is_dropped_once_memcached_says_the_entry_is_gone(pipe: Pipeline) -> None:
    pipe.region.get_or_load(pipe.job(value="v1"))
    pipe.store.delete("k")  # invalidated by another worker
    assert pipe.region.get_or_load(pipe.job(value="v2")).status == "HIT"  # within l1_ttl
    pipe.clock.advance(2.5)
    result = pipe.region.get_or_load(pipe.job(value="v2"))
    assert (result.status, result.value) == ("MISS", "v2")


def read_after_l1_ttl_with_the_origin_down(pipe: Pipeline) -> Any:
    pipe.clock.advance(2.5)                           # past l1_ttl: memcached is asked
    return pipe.region.get_or_load(pipe.job(fail=OriginError("down")))


def another_worker(pipe: Pipeline) -> TwoTier:
    """A second worker's tiers over the same memcached (its own local tier)."""
    return TwoTier(pipe.store, LocalTier(100), 2.0, pipe.clock)  # type: ignore[arg-type]


def test_a_copy_invalidated_elsewhere_is_not_served_when_the_origin_fails(
        pipe: Pipeline) -> None:
    pipe.region.get_or_load(pipe.job(value="v1"))
    pipe.clock.advance(1)
    another_worker(pipe).delete("k", pipe.clock())   # an admin's DELETE, over there
    with pytest.raises(OriginError):
        read_after_l1_ttl_with_the_origin_down(pipe)
    assert pipe.tiers.local.get("k") is None          # and the copy is dropped for good


def test_a_copy_memcached_merely_lost_is_still_served_when_the_origin_fails(
        pipe: Pipeline) -> None:
    pipe.region.get_or_load(pipe.job(value="v1"))
    pipe.store.delete("k")                            # flushed, evicted: no mark
    result = read_after_l1_ttl_with_the_origin_down(pipe)
    assert (result.status, result.value) == ("STALE", "v1")


def test_a_copy_stored_after_an_invalidation_is_still_a_last_good_copy(
        pipe: Pipeline) -> None:
    pipe.region.get_or_load(pipe.job(value="v1"))
    pipe.clock.advance(1)
    pipe.region.invalidate("k")
    pipe.clock.advance(1)
    assert pipe.region.get_or_load(pipe.job(value="v2")).status == "MISS"
    pipe.store.delete("k")                            # then memcached loses it
    result = read_after_l1_ttl_with_the_origin_down(pipe)
    assert (result.status, result.value) == ("STALE", "v2")


def test_the_last_good_copy_is_served_when_memcached_cannot_say_it_was_forgotten(
        pipe: Pipeline) -> None:
    pipe.region.get_or_load(pipe.job(value="v1"))
    pipe.store.down = True
    copy = pipe.tiers.last_good("k")
    assert copy is not None and copy.value == "v1"


def test_an_invalidation_marks_before_it_deletes(pipe: Pipeline) -> None:
    pipe.region.get_or_load(pipe.job(value="v1"))
    pipe.store.calls.clear()
    pipe.region.invalidate("k")
    assert pipe.store.calls == ["set", "delete"]
    assert pipe.store.get(forgotten_key("k")) == pipe.clock()


def test_memcached_down_still_answers_and_serves_the_local_copy(pipe: Pipeline) -> None:
    pipe.store.down = True
    assert pipe.region.get_or_load(pipe.job(value="v1")).value == "v1"
    pipe.clock.advance(5)  # past l1_ttl: memcached would be asked, and is down
    result = pipe.region.get_or_load(pipe.job(value="v2"))
    assert (result.status, result.value) == ("HIT", "v1")


# -- what is stored ---------------------------------------------------------------------------

def test_an_uncacheable_value_is_answered_to_its_caller_only(pipe: Pipeline) -> None:
    job = pipe.job(value="error page", storable=lambda v: UNCACHEABLE)
    result = pipe.region.get_or_load(job)
    assert (result.value, result.entry, result.status) == ("error page", None, "MISS")
    assert "k" not in pipe.store.items and lease_key("k") not in pipe.store.items
    assert pipe.region.get_or_load(job).status == "MISS"
    assert pipe.calls == ["k", "k"]


def test_unwrapped_exceptions_propagate_as_raised_and_release_the_lease(
        pipe: Pipeline) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        pipe.region.get_or_load(pipe.job(fail=Boom("x"), wrap_errors=False))
    assert lease_key("k") not in pipe.store.items
    assert error_key("k") not in pipe.store.items  # only origin errors are remembered
    with pytest.raises(OriginError, match="Boom"):
        pipe.region.get_or_load(pipe.job(key="k2", fail=Boom("x")))


# -- forced refreshes and periodic jobs --------------------------------------------------------

def test_the_admins_refresh_fetches_even_a_fresh_entry(pipe: Pipeline) -> None:
    pipe.store_entry("k", "fresh", pipe.clock())
    assert pipe.region.refresh_later(pipe.job(value="forced"))
    assert pipe.refresher.join(timeout=5)
    assert pipe.calls == ["k"]
    raw, _ = pipe.store.gets("k")
    assert Entry.from_wire(raw).value == "forced"


def test_a_failing_background_refresh_is_remembered_and_backs_off(pipe: Pipeline) -> None:
    pipe.store_entry("k", "old", pipe.clock())
    pipe.clock.advance(15)
    assert pipe.region.get_or_load(pipe.job(fail=OriginError("down"))).status == "STALE"
    assert pipe.refresher.join(timeout=5)
    assert pipe.refresher.failures("k") == 1
    assert pipe.ledger.get("k") is not None and pipe.ledger.get("k").last_outcome == "error"
    # Backing off: the next stale read does not schedule another refresh right away.
    assert pipe.region.get_or_load(pipe.job()).status == "STALE"
    assert pipe.refresher.join(timeout=5)
    assert pipe.calls == ["k"]


def test_an_error_record_without_its_own_end_is_ignored(pipe: Pipeline) -> None:
    # Written without an expiry (by accident or on purpose): it must not make the key
    # answer 502 forever.
    pipe.store.set(error_key("k"), {"status": 502, "detail": "stuck"}, None)
    pipe.store.set(error_key("k2"), {"status": 502, "detail": "old",
                                     "until": pipe.clock() - 1}, None)
    assert pipe.region.get_or_load(pipe.job()).value == "v"
    assert pipe.region.get_or_load(pipe.job(key="k2")).value == "v"


def test_a_lease_without_a_live_deadline_is_taken_over_at_once(pipe: Pipeline) -> None:
    # A lease item written without an expiry (garbage, or past its own deadline) would
    # otherwise make every reader wait for a holder that does not exist.
    pipe.store.add(lease_key("k"), "garbage", None)
    pipe.store.add(lease_key("k2"), lease_value("gone", time.time() - 60), None)
    assert pipe.region.get_or_load(pipe.job()).value == "v"
    assert pipe.region.get_or_load(pipe.job(key="k2")).value == "v"
    assert pipe.calls == ["k", "k2"]


def test_stale_reads_do_not_ask_for_a_lease_another_worker_holds_for_a_moment(
        pipe: Pipeline) -> None:
    pipe.store_entry("k", "old", pipe.clock())
    pipe.clock.advance(15)                                   # stale
    pipe.store.add(lease_key("k"), lease_value("another-worker", time.time() + 30), 30)
    assert pipe.region.get_or_load(pipe.job()).status == "STALE"
    assert pipe.refresher.join(timeout=5)                    # it found the lease held
    adds = pipe.store.calls.count("add")
    for _ in range(20):
        assert pipe.region.get_or_load(pipe.job()).status == "STALE"
    assert pipe.refresher.join(timeout=5)
    assert pipe.store.calls.count("add") == adds             # no lease asked for again
    pipe.clock.advance(1.1)                                  # the moment passed
    assert pipe.region.get_or_load(pipe.job()).status == "STALE"
    assert pipe.refresher.join(timeout=5)
    assert pipe.store.calls.count("add") == adds + 1         # asked again, once
    assert pipe.calls == []                                  # the holder does the work
