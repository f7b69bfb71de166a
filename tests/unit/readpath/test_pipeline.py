"""The whole read pipeline (region, loader, tiers, claims, refresher) over an in-memory
store that answers the meta commands as memcached does, on a fake clock: every claim,
waiter, refresh and fencing decision. memcached itself is proven in tests/integration."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import pytest
from flask import Flask

from service.config import RefreshSettings
from service.errors import OriginError
from service.flask.state import in_app_context
from service.memcache.store import EMPTY, MISS
from service.readpath.entry import Entry
from service.readpath.freshness import Windows
from service.readpath.lease import PASS_RECORD, Leases, error_of, error_record, is_pass
from service.readpath.ledger import Ledger
from service.readpath.loader import UNCACHEABLE, Job, Loader
from service.readpath.refresher import Refresher
from service.readpath.region import Region
from service.readpath.tiers import LocalTier, TwoTier
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
        # As the loader writes it: memcached's TTL is the entry's whole lifetime, which is
        # what lets a reader take the entry's age from the server's clock.
        self.store.set(key, entry.to_wire(), WINDOWS.lifetime - (self.clock() - stored_at))
        return entry

    def hold(self, key: str = "k") -> bytes:
        """Another worker wins the key's cold claim; returns its fence."""
        got = self.store.mget(key, vivify=5)
        assert got.won and got.cas is not None
        return got.cas

    @property
    def leases(self) -> MemoryStore:
        """The refresh leases' family, as the loader's claims see it."""
        return self.store.child("lease")

    def polls(self) -> int:
        return self.store.calls.count("mg")


@pytest.fixture
def pipe() -> Iterator[Pipeline]:
    clock = FakeClock()
    store = MemoryStore(clock)
    app = Flask("pipeline")
    settings = RefreshSettings(lock_lease=5.0, fetch_timeout=5.0, error_ttl=5.0,
                               xfetch_beta=0.0)
    tiers = TwoTier(store, LocalTier(100), 2.0, clock, clock,
                    server_ages=True)  # the memory store's TTLs run on the same fake clock
    ledger = Ledger(100)
    loader = Loader(tiers, Leases(store, 5.0), settings,
                    in_app_context(app), clock, clock, observer=ledger)
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
    assert Entry.is_wire(pipe.store.get("k"))  # the claim's item now holds the entry


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
    fence = pipe.hold()
    reader = gevent.spawn(pipe.region.get_or_load, pipe.job())
    wait_until(lambda: pipe.polls() >= 3)  # it is polling
    entry = Entry.create("theirs", pipe.clock(), WINDOWS, 0.0)
    assert pipe.store.mset("k", entry.to_wire(), WINDOWS.lifetime, cas=fence).ok
    result = reader.get(timeout=5)
    assert (result.status, result.value) == ("MISS", "theirs")
    assert pipe.calls == []


def test_a_waiter_raises_the_holders_failure_that_replaced_its_claim(
        pipe: Pipeline) -> None:
    fence = pipe.hold()
    reader = gevent.spawn(pipe.region.get_or_load, pipe.job())
    wait_until(lambda: pipe.polls() >= 3)
    assert pipe.store.mset("k", error_record(OriginError("origin said 500")), 5,
                           cas=fence).ok
    with pytest.raises(OriginError, match="origin said 500"):
        reader.get(timeout=5)
    assert pipe.calls == []


def test_a_waiter_takes_over_when_the_claim_lapses_with_nothing_stored(
        pipe: Pipeline) -> None:
    pipe.hold()                                      # a worker that then died
    reader = gevent.spawn(pipe.region.get_or_load, pipe.job(value="mine"))
    wait_until(lambda: pipe.polls() >= 3)
    pipe.clock.advance(6)  # the dead holder's item expires on the server's clock
    result = reader.get(timeout=5)
    assert (result.status, result.value) == ("MISS", "mine")
    assert pipe.calls == ["k"]


def test_a_remembered_error_answers_cold_reads_without_fetching(pipe: Pipeline) -> None:
    with pytest.raises(OriginError):
        pipe.region.get_or_load(pipe.job(fail=OriginError("boom")))
    assert error_of(pipe.store.get("k")) is not None   # it replaced the claim
    with pytest.raises(OriginError, match="remembered"):
        pipe.region.get_or_load(pipe.job())
    assert pipe.calls == ["k"]
    pipe.clock.advance(6)  # error_ttl passed: the server dropped the record
    assert pipe.region.get_or_load(pipe.job()).value == "v"


def test_the_item_is_rechecked_by_a_load(pipe: Pipeline) -> None:
    # The entry landed between our miss and our load (dogpile's rule): no fetch.
    pipe.store_entry("k", "landed", pipe.clock())
    loaded = pipe.loader.load(pipe.job(), pipe.region.servable)
    assert loaded.value == "landed" and pipe.calls == []


def test_a_hostile_empty_item_without_expiry_is_no_claim(pipe: Pipeline) -> None:
    # An empty item nobody vivified (written without an expiry) would otherwise make
    # every reader wait for a holder that does not exist.
    pipe.store.set("k", EMPTY, None)
    assert pipe.region.get_or_load(pipe.job()).value == "v"
    assert pipe.calls == ["k"]


# -- uncacheable answers: nobody queues ---------------------------------------------------

def test_an_uncacheable_value_is_answered_to_its_caller_only(pipe: Pipeline) -> None:
    job = pipe.job(value="error page", storable=lambda v: UNCACHEABLE)
    result = pipe.region.get_or_load(job)
    assert (result.value, result.entry, result.status) == ("error page", None, "PASS")
    assert is_pass(pipe.store.get("k"))   # hit-for-miss: the next readers do not coalesce
    assert pipe.region.get_or_load(job).status == "PASS"
    assert pipe.calls == ["k", "k"]


def test_followers_of_an_uncacheable_answer_run_at_once_and_concurrently(
        pipe: Pipeline) -> None:
    gate = gevent.event.Event()
    job = pipe.job(value="set-cookie", storable=lambda v: UNCACHEABLE, gate=gate)
    readers = spawn_readers(8, lambda: pipe.region.get_or_load(job))
    wait_until(lambda: pipe.calls == ["k"])          # one leader, seven followers
    gate.set()
    # The followers are released when the leader's answer turns out uncacheable, and
    # all seven run their own fetch at once (the gate is open): nobody waits for another.
    gevent.joinall(readers, raise_error=True, timeout=5)
    assert pipe.calls == ["k"] * 8
    assert {r.value.status for r in readers} == {"PASS"}


def test_waiters_in_other_workers_run_at_once_when_the_holder_passes(pipe: Pipeline) -> None:
    fence = pipe.hold()
    reader = gevent.spawn(pipe.region.get_or_load, pipe.job(value="mine"))
    wait_until(lambda: pipe.polls() >= 3)
    assert pipe.store.mset("k", PASS_RECORD, 5, cas=fence).ok
    assert reader.get(timeout=5).value == "mine"     # it ran the fetch itself, at once
    assert pipe.calls == ["k"]


def test_a_cacheable_answer_replaces_the_pass_record(pipe: Pipeline) -> None:
    pipe.store.set("k", PASS_RECORD, 5)
    assert pipe.region.get_or_load(pipe.job(value="ok")).status == "MISS"
    assert Entry.is_wire(pipe.store.get("k"))
    pipe.clock.advance(2.5)
    assert pipe.region.get_or_load(pipe.job()).status == "HIT"


def test_unwrapped_exceptions_propagate_as_raised_and_pass_the_claim(
        pipe: Pipeline) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        pipe.region.get_or_load(pipe.job(fail=Boom("x"), wrap_errors=False))
    assert is_pass(pipe.store.get("k"))        # waiters run the view themselves, at once
    with pytest.raises(OriginError, match="Boom"):
        pipe.region.get_or_load(pipe.job(key="k2", fail=Boom("x")))


def test_followers_of_a_leader_that_raised_run_the_view_themselves(pipe: Pipeline) -> None:
    class Boom(Exception):
        pass

    gate = gevent.event.Event()
    readers = spawn_readers(4, lambda: pipe.region.get_or_load(
        pipe.job(fail=Boom("x"), wrap_errors=False, gate=gate)))
    wait_until(lambda: pipe.calls == ["k"])
    gate.set()
    gevent.joinall(readers, timeout=5)
    assert all(isinstance(r.exception, Boom) for r in readers)
    assert pipe.calls == ["k"] * 4


# -- stale, stale-if-error, gone ---------------------------------------------------------------

def test_a_stale_read_answers_at_once_and_one_background_refresh_runs(pipe: Pipeline) -> None:
    pipe.store_entry("k", "old", pipe.clock())
    pipe.clock.advance(15)  # stale
    results = [pipe.region.get_or_load(pipe.job(value="new")) for _ in range(5)]
    assert {(r.status, r.value) for r in results} == {("STALE", "old")}
    assert pipe.refresher.join(timeout=5)
    assert pipe.calls == ["k"]
    assert pipe.region.get_or_load(pipe.job()).value == "new"
    assert pipe.leases.get("k") is MISS  # given back after the write


def test_a_background_refresh_never_overwrites_a_newer_entry(pipe: Pipeline) -> None:
    pipe.store_entry("k", "old", pipe.clock())
    pipe.clock.advance(15)
    seen = pipe.tiers.read_shared("k")
    assert seen is not None
    pipe.store_entry("k", "refreshed-by-another-worker", pipe.clock())
    assert pipe.loader.refresh(pipe.job(value="late"), pipe.region.never, seen) is None
    assert Entry.from_wire(pipe.store.get("k")).value == "refreshed-by-another-worker"


def test_a_background_refresh_leaves_it_to_the_lease_holder(pipe: Pipeline) -> None:
    pipe.store_entry("k", "old", pipe.clock())
    assert pipe.leases.mset("k", "another-worker", 5, add=True).ok
    assert pipe.loader.refresh(pipe.job(), pipe.region.never) is None
    assert pipe.calls == []


def test_a_refresh_that_finds_the_claim_held_settles_its_flight(pipe: Pipeline) -> None:
    pipe.store_entry("k", "old", pipe.clock())
    pipe.clock.advance(40)                            # usable only on error
    assert pipe.leases.mset("k", "another-worker", 5, add=True).ok
    refresh = gevent.spawn(pipe.loader.refresh, pipe.job(), pipe.region.never)
    reader = gevent.spawn(pipe.region.get_or_load, pipe.job(value="mine"))
    assert refresh.get(timeout=5) is None
    pipe.leases.mdelete("k")                # the other worker gave up
    assert reader.get(timeout=5).value == "mine"      # never hangs on the settled flight


def test_stale_if_error_serves_the_old_copy_when_the_fetch_fails(pipe: Pipeline) -> None:
    pipe.store_entry("k", "old", pipe.clock())
    pipe.clock.advance(35)  # past stale_while_revalidate, inside stale_if_error
    result = pipe.region.get_or_load(pipe.job(fail=OriginError("down")))
    assert (result.status, result.value) == ("STALE", "old")
    assert error_of(pipe.leases.get("k")) is not None  # the lease remembers why
    pipe.clock.advance(30)  # gone
    with pytest.raises(OriginError):
        pipe.region.get_or_load(pipe.job(fail=OriginError("down")))


def test_a_fetch_whose_claim_was_replaced_is_not_stored_nor_answered(
        pipe: Pipeline) -> None:
    gate = gevent.event.Event()
    reader = gevent.spawn(pipe.region.get_or_load, pipe.job(value="slow", gate=gate))
    wait_until(lambda: pipe.calls == ["k"])
    # Our claim lapses; another worker stores a newer entry meanwhile.
    pipe.store.mdelete("k")
    pipe.store_entry("k", "newer", pipe.clock())
    gate.set()
    assert reader.get(timeout=5).value == "newer"   # the stored value, not our late one
    assert Entry.from_wire(pipe.store.get("k")).value == "newer"


def test_a_fetch_that_began_before_an_invalidation_is_fetched_again(pipe: Pipeline) -> None:
    gate = gevent.event.Event()
    origin = {"data": "v1"}

    def fetch() -> str:
        seen = origin["data"]
        pipe.calls.append("k")
        gate.wait()
        return seen

    job = Job("k", fetch, WINDOWS, source="src")
    reader = gevent.spawn(pipe.region.get_or_load, job)
    wait_until(lambda: pipe.calls == ["k"])
    origin["data"] = "v2"
    another_worker(pipe).delete("k")                  # the data changed: invalidated
    gate.set()
    assert reader.get(timeout=5).value == "v2"
    assert Entry.from_wire(pipe.store.get("k")).value == "v2"


# -- the local tier, lost entries and invalidation -----------------------------------------------

def test_a_local_copy_is_dropped_once_memcached_says_it_was_invalidated(
        pipe: Pipeline) -> None:
    pipe.region.get_or_load(pipe.job(value="v1"))
    another_worker(pipe).delete("k")  # invalidated by another worker
    assert pipe.region.get_or_load(pipe.job(value="v2")).status == "HIT"  # within l1_ttl
    pipe.clock.advance(2.5)
    result = pipe.region.get_or_load(pipe.job(value="v2"))
    assert (result.status, result.value) == ("MISS", "v2")


def test_a_lost_entry_is_answered_stale_at_once_and_refreshed_once(pipe: Pipeline) -> None:
    pipe.region.get_or_load(pipe.job(value="v1"))
    pipe.store.flush()                          # memcached restarted empty
    pipe.clock.advance(2.5)
    gate = gevent.event.Event()
    results = [pipe.region.get_or_load(pipe.job(value="v2", gate=gate)) for _ in range(5)]
    assert {(r.status, r.value) for r in results} == {("STALE", "v1")}  # nobody waited
    gate.set()
    assert pipe.refresher.join(timeout=5)
    assert pipe.calls == ["k", "k"]                   # the first load, one refresh
    assert Entry.from_wire(pipe.store.get("k")).value == "v2"


def read_after_l1_ttl_with_the_origin_down(pipe: Pipeline) -> Any:
    pipe.clock.advance(2.5)                           # past l1_ttl: memcached is asked
    return pipe.region.get_or_load(pipe.job(fail=OriginError("down")))


def another_worker(pipe: Pipeline, skew: float = 0.0) -> TwoTier:
    """A second worker's tiers over the same memcached (its own local tier, and a clock
    ``skew`` seconds off)."""
    return TwoTier(pipe.store, LocalTier(100), 2.0, pipe.clock,
                   lambda: pipe.clock() + skew, server_ages=True)


def test_a_copy_invalidated_elsewhere_is_not_served_when_the_origin_fails(
        pipe: Pipeline) -> None:
    pipe.region.get_or_load(pipe.job(value="v1"))
    pipe.clock.advance(1)
    another_worker(pipe).delete("k")                  # an admin's DELETE, over there
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


def test_an_invalidation_is_judged_by_epoch_not_by_clocks(pipe: Pipeline) -> None:
    pipe.region.get_or_load(pipe.job(value="v1"))
    another_worker(pipe, skew=-3600).delete("k")      # its clock is an hour behind
    with pytest.raises(OriginError):
        read_after_l1_ttl_with_the_origin_down(pipe)


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
    assert pipe.store.calls == ["ms", "md"]
    assert isinstance(pipe.store.child("forgot").get("k"), str)


def test_memcached_down_still_answers_and_serves_the_local_copy(pipe: Pipeline) -> None:
    pipe.store.down = True
    assert pipe.region.get_or_load(pipe.job(value="v1")).value == "v1"
    pipe.clock.advance(5)  # past l1_ttl: memcached would be asked, and is down
    result = pipe.region.get_or_load(pipe.job(value="v2"))
    assert (result.status, result.value) == ("HIT", "v1")


def test_a_copy_memcached_called_gone_is_no_hit_when_memcached_goes_down(
        pipe: Pipeline) -> None:
    pipe.region.get_or_load(pipe.job(value="v1"))
    another_worker(pipe).delete("k")
    pipe.clock.advance(2.5)
    pipe.store.down = True
    pipe.tiers.look("k")                               # no: memcached is down now
    pipe.store.down = False
    pipe.tiers.look("k")                               # memcached says: gone
    pipe.store.down = True
    pipe.clock.advance(2.5)
    result = pipe.region.get_or_load(pipe.job(value="v2"))
    assert (result.status, result.value) == ("MISS", "v2")   # the origin is up: asked


# -- clocks ---------------------------------------------------------------------------------------

def test_a_host_whose_clock_is_off_answers_the_age_memcached_counts(pipe: Pipeline) -> None:
    pipe.store_entry("k", "v", pipe.clock())
    pipe.clock.advance(4)
    for skew in (-30.0, 30.0):
        found = another_worker(pipe, skew).read("k")
        assert found is not None
        age = found.entry.timing.age(pipe.clock() + skew)
        assert 2.5 <= age <= 5.5, (skew, age)


# -- forced refreshes and periodic jobs --------------------------------------------------------

def test_the_admins_refresh_fetches_even_a_fresh_entry(pipe: Pipeline) -> None:
    pipe.store_entry("k", "fresh", pipe.clock())
    assert pipe.region.refresh_later(pipe.job(value="forced"))
    assert pipe.refresher.join(timeout=5)
    assert pipe.calls == ["k"]
    assert Entry.from_wire(pipe.store.get("k")).value == "forced"


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


def test_garbage_under_a_key_is_replaced_under_its_lease(pipe: Pipeline) -> None:
    pipe.store.set("k", {"status": 502, "detail": "stuck"}, None)  # no entry, no record
    assert pipe.region.get_or_load(pipe.job()).value == "v"
    assert Entry.is_wire(pipe.store.get("k"))


def test_stale_reads_do_not_ask_for_a_lease_another_worker_holds_for_a_moment(
        pipe: Pipeline) -> None:
    pipe.store_entry("k", "old", pipe.clock())
    pipe.clock.advance(15)                                   # stale
    assert pipe.leases.mset("k", "another-worker", 30, add=True).ok
    assert pipe.region.get_or_load(pipe.job()).status == "STALE"
    assert pipe.refresher.join(timeout=5)                    # it found the lease held
    writes = pipe.store.calls.count("ms")
    for _ in range(20):
        assert pipe.region.get_or_load(pipe.job()).status == "STALE"
    assert pipe.refresher.join(timeout=5)
    assert pipe.store.calls.count("ms") == writes            # no lease asked for again
    pipe.clock.advance(1.1)                                  # the moment passed
    assert pipe.region.get_or_load(pipe.job()).status == "STALE"
    assert pipe.refresher.join(timeout=5)
    assert pipe.store.calls.count("ms") == writes + 1        # asked again, once
    assert pipe.calls == []                                  # the holder does the work


def test_a_stale_read_never_waits_for_a_full_refresher(pipe: Pipeline) -> None:
    gate = gevent.event.Event()
    for i in range(5):
        pipe.store_entry(f"k{i}", "old", pipe.clock())
    pipe.clock.advance(15)                                   # all stale
    for i in range(4):                                       # the pool's 4 slots, taken
        assert pipe.region.get_or_load(pipe.job(f"k{i}", gate=gate)).status == "STALE"
    wait_until(lambda: len(pipe.calls) == 4)
    reader = gevent.spawn(pipe.region.get_or_load, pipe.job("k4", gate=gate))
    try:
        result = reader.get(timeout=5)                       # not after the others
        assert (result.status, result.value) == ("STALE", "old")
    finally:
        gate.set()
        assert pipe.refresher.join(timeout=5)
