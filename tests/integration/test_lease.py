"""Claims against a real memcached: one winner, fenced writes, owner-only release, renew,
compare-and-delete."""

from __future__ import annotations

from typing import Any

import gevent
import pytest
from flask import Flask

from service.flask.state import AppState, state_of
from service.memcache.store import EMPTY, MISS
from service.readpath.lease import PASS_RECORD
from tests.conftest import settings_for

pytestmark = pytest.mark.memcached


@pytest.fixture
def cache(memcached: Any, make_app: Any) -> Any:
    app: Flask = make_app(settings_for([memcached.address], refresh={"lock_lease": 5}))
    with app.app_context():
        swr: AppState = state_of(app)
        yield swr


def test_exactly_one_of_many_readers_wins_a_missing_key(cache: AppState) -> None:
    store = cache.tiers.store
    # Twenty greenlets, each with its own pooled connection, race mg ... N on one key.
    got = [g.get(timeout=5) for g in [gevent.spawn(store.mget, "k", 5) for _ in range(20)]]
    assert sum(1 for r in got if r.won) == 1
    assert all(r.value is EMPTY for r in got)            # everybody sees the claim
    winner = next(r for r in got if r.won)
    assert {r.cas for r in got} == {winner.cas}          # one item, one token


def test_a_cold_claims_write_is_fenced_against_an_invalidation(cache: AppState) -> None:
    store = cache.tiers.store
    won = store.mget("k", vivify=5)
    assert won.won
    store.mdelete("k")                                   # invalidated meanwhile
    assert store.mset("k", "late", 60, cas=won.cas).code == "NF"   # not turned into an add
    assert store.get("k") is MISS
    again = store.mget("k", vivify=5)
    assert again.won and again.cas != won.cas
    assert store.mset("k", "fresh", 60, cas=again.cas).ok
    assert store.mset("k", "older", 60, cas=again.cas).code == "EX"
    assert store.get("k") == "fresh"


def test_only_one_refresh_lease_and_only_its_owner_gives_it_back(cache: AppState) -> None:
    first = cache.leases.acquire("k", None)
    assert first is not None
    assert cache.leases.acquire("k", None) is None     # an add while it is held
    assert cache.leases.holder("k") == cache.leases.token
    assert cache.leases.release(first)
    second = cache.leases.acquire("k", None)          # nothing lingers after release
    assert second is not None
    cache.leases.leases.mdelete("k")                   # lapsed / evicted
    third = cache.leases.acquire("k", None)
    assert third is not None
    assert not cache.leases.renew(second)
    assert not cache.leases.release(second)            # never the new holder's lease
    assert cache.leases.lease_record("k") is not MISS
    assert cache.leases.renew(third)
    assert cache.leases.release(third)


def test_renewing_a_cold_claim_keeps_it_won(cache: AppState) -> None:
    store = cache.tiers.store
    won = store.mget("k", vivify=2)
    claim = cache.tiers.classify("k", won).claim
    assert claim is not None
    assert cache.leases.renew(claim)
    after = store.mget("k", vivify=2)
    assert after.value is EMPTY and not after.won       # still held: nobody else wins
    assert after.ttl is not None and after.ttl >= 3     # lock_lease (5) from now


def test_a_claim_replaced_by_a_record_says_why(cache: AppState) -> None:
    store = cache.tiers.store
    claim = cache.tiers.classify("k", store.mget("k", vivify=5)).claim
    assert claim is not None
    assert cache.leases.replace(claim, PASS_RECORD, 5)
    look = cache.tiers.look_shared("k", 5)
    assert look.passing and look.claim is None


def test_compare_and_delete_spares_a_value_replaced_after_the_read(
    cache: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = cache.tiers.store
    store.set("x", "token-a")
    read = store.gets

    def gets_then_someone_writes(key: str) -> Any:
        result = read(key)
        # Between our read and our delete, another holder writes the same bytes: only the
        # CAS token tells the two apart, and it must stop the delete.
        store.set(key, "token-a")
        return result

    monkeypatch.setattr(store, "gets", gets_then_someone_writes)
    assert store.delete_if("x", "token-a") is False
    monkeypatch.undo()
    assert store.get("x") == "token-a"
    assert store.delete_if("x", "other") is False        # a different value: untouched
    assert store.delete_if("x", "token-a") is True
    assert store.get("x") is MISS
