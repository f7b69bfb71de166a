"""A worker's own copy, computed while its key's server could not be asked, is never
replaced by memcached's older one when the server answers again: it is written back.

Otherwise a host cut off from a key's server answers the newer value it fetched itself,
then, once the server answers, the fleet's older one: its readers go back in time
(``tests/integration/test_netns_fleet.py`` shows it across real hosts).
"""

from __future__ import annotations

import dataclasses

from service.readpath.entry import Entry
from service.readpath.freshness import Windows
from service.readpath.tiers import LocalTier, TwoTier
from tests.conftest import FakeClock
from tests.memstore import MemoryStore

W = Windows(30, 300)
L1_TTL = 2.0


def setup() -> tuple[FakeClock, MemoryStore, TwoTier]:
    clock = FakeClock()
    store = MemoryStore(clock)
    return clock, store, TwoTier(store, LocalTier(100), L1_TTL, clock, clock, server_ages=True)


def shared(store: MemoryStore, clock: FakeClock, value: object, epoch: str = "") -> Entry:
    """What another host stored (with its claim) at ``clock()``."""
    entry = dataclasses.replace(Entry.create(value, clock(), W, 0.1), epoch=epoch)
    store.mset("k", entry.to_wire(), entry.ttl(clock()))
    return entry


def cut_off_and_fetch(store: MemoryStore, tiers: TwoTier, clock: FakeClock,
                      value: object, epoch: str = "") -> None:
    """This worker cannot ask memcached: it computes the value and keeps it to itself."""
    store.down = True
    entry = dataclasses.replace(Entry.create(value, clock(), W, 0.1), epoch=epoch)
    tiers.write("k", entry, None)
    store.down = False


def test_a_newer_own_copy_is_answered_and_written_back() -> None:
    clock, store, tiers = setup()
    shared(store, clock, "v1")
    clock.advance(5)
    cut_off_and_fetch(store, tiers, clock, "v2")
    clock.advance(L1_TTL + 1)                     # past l1_ttl: memcached is asked again
    look = tiers.look("k")
    assert look.found is not None and look.found.entry.value == "v2"
    assert store.mget("k").value["value"] == "v2", "the newer copy was not written back"
    clock.advance(L1_TTL + 1)
    again = tiers.look("k")                      # now memcached's, and shared
    assert again.found is not None and again.found.entry.value == "v2"
    assert again.found.tier == "memcached"


def test_a_refresh_stored_after_the_own_copy_wins() -> None:
    clock, store, tiers = setup()
    shared(store, clock, "v1")
    clock.advance(5)
    cut_off_and_fetch(store, tiers, clock, "v2")
    clock.advance(5)
    shared(store, clock, "v3")                   # refreshed by another host, later
    clock.advance(L1_TTL)
    look = tiers.look("k")
    assert look.found is not None and look.found.entry.value == "v3"
    assert store.mget("k").value["value"] == "v3"


def test_an_own_copy_of_another_epoch_never_overwrites_memcached() -> None:
    clock, store, tiers = setup()
    cut_off_and_fetch(store, tiers, clock, "before", epoch="")
    clock.advance(1)
    store.down = False
    shared(store, clock, "after-invalidation", epoch="e2")  # an invalidation in between
    clock.advance(5)
    # Even with our copy stamped later, a different epoch means memcached's copy wins.
    item = tiers.local.peek("k")
    assert item is not None
    item.entry = dataclasses.replace(item.entry, timing=dataclasses.replace(
        item.entry.timing, stored_at=clock()))
    look = tiers.look("k")
    assert look.found is not None and look.found.entry.value == "after-invalidation"
    assert store.mget("k").value["value"] == "after-invalidation"


def test_a_copy_read_from_memcached_is_never_written_back() -> None:
    clock, store, tiers = setup()
    shared(store, clock, "v1")
    tiers.look("k")                              # our copy is memcached's (it has a CAS)
    clock.advance(L1_TTL + 1)
    store.calls.clear()
    look = tiers.look("k")
    assert look.found is not None and look.found.entry.value == "v1"
    assert "ms" not in store.calls
