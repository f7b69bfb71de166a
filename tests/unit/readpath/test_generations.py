"""Generations (service.readpath.generations): when a worker asks memcached, what a bump reaches,
and what a lost counter restarts at. An in-memory store shared by two "workers" and a
fake clock; the integration tests (test_delete_memoized, test_fastpath, test_admin) run
the same code against memcached."""

from __future__ import annotations

from typing import Any

import pytest

from service.errors import CacheUnavailable
from service.readpath import generations
from service.readpath.generations import Generations
from tests.conftest import FakeClock
from tests.memstore import MemoryStore

L1_TTL = 2.0


def worker(store: MemoryStore, clock: FakeClock) -> Generations:
    """One worker's generations, over the store every worker shares."""
    return Generations(store, L1_TTL, clock)


@pytest.fixture
def fleet(clock: FakeClock) -> tuple[MemoryStore, Any, Any]:
    store = MemoryStore(clock)
    return store, worker(store, clock), worker(store, clock)


def test_a_worker_asks_memcached_at_most_once_per_l1_ttl(
        fleet: tuple[MemoryStore, Any, Any], clock: FakeClock) -> None:
    store, a, _ = fleet
    first = a.current("report")
    reads = store.calls.count("gets")
    clock.advance(L1_TTL - 0.01)
    assert a.current("report") == first
    assert store.calls.count("gets") == reads          # answered from the worker's copy
    clock.advance(0.01)
    assert a.current("report") == first
    assert store.calls.count("gets") == reads + 1      # l1_ttl passed: asked again


def test_a_bump_reaches_its_worker_at_once_and_the_others_within_l1_ttl(
        fleet: tuple[MemoryStore, Any, Any], clock: FakeClock) -> None:
    _, a, b = fleet
    before = a.current("report")
    assert b.current("report") == before
    bumped = a.bump("report")
    assert bumped == before + 1
    assert a.current("report") == bumped   # the bumping worker: at once
    assert b.current("report") == before   # another: still its copy...
    clock.advance(L1_TTL)
    assert b.current("report") == bumped   # ...until l1_ttl has passed


def test_families_are_counted_apart(fleet: tuple[MemoryStore, Any, Any]) -> None:
    _, a, _ = fleet
    source = a.current("report")
    function = a.current(generations.function_family("app.report"))
    a.bump(generations.function_family("app.report"))
    assert a.current("report") == source
    assert a.current(generations.function_family("app.report")) == function + 1


def test_a_lost_counter_never_restarts_at_a_number_used_before(
        fleet: tuple[MemoryStore, Any, Any], clock: FakeClock) -> None:
    store, a, b = fleet
    used = {a.current("report")}
    used.add(b.bump("report"))      # b bumped; a has not seen it yet
    store.flush()                          # memcached restarted empty
    clock.advance(L1_TTL)
    # a remembers a number older than the bump: putting it back would undo the bump.
    restarted = a.current("report")
    assert restarted not in used
    assert b.current("report") == restarted   # and the fleet agrees on it
    fresh = worker(store, clock)                 # a worker that never read it
    assert fresh.current("report") == restarted


def test_a_bump_of_a_lost_counter_moves_to_a_number_never_used(
        fleet: tuple[MemoryStore, Any, Any]) -> None:
    store, a, _ = fleet
    known = a.current("report")
    store.flush()
    bumped = a.bump("report")
    assert bumped not in (known, known + 1) and bumped >= 2**40


def test_memcached_down_reads_the_last_known_number_and_refuses_a_bump(
        fleet: tuple[MemoryStore, Any, Any], clock: FakeClock) -> None:
    store, a, b = fleet
    known = a.current("report")
    store.down = True
    clock.advance(L1_TTL)
    assert a.current("report") == known
    assert b.current("report") == 0        # never knew one: nothing to keep
    with pytest.raises(CacheUnavailable):
        a.bump("report")
    store.down = False
    clock.advance(L1_TTL)
    assert a.current("report") == known    # nothing was bumped
    assert b.current("report") == known    # and b finds the real number


def test_the_bumping_worker_keeps_its_new_number_when_memcached_fails_next(
        fleet: tuple[MemoryStore, Any, Any]) -> None:
    store, a, _ = fleet
    a.current("report")
    bumped = a.bump("report")
    store.down = True
    assert a.current("report") == bumped    # never back to an old number


def test_a_worker_that_knows_no_number_does_not_keep_the_fallback(
        fleet: tuple[MemoryStore, Any, Any]) -> None:
    store, a, b = fleet
    real = a.current("report")
    store.down = True
    assert b.current("report") == 0         # for this call only...
    store.down = False
    assert b.current("report") == real      # ...not for l1_ttl
