"""The lease against a real memcached: owner-only release, renew, compare-and-delete."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from service.lease import lease_key
from service.state import AppState, state_of
from service.store import MISS
from tests.conftest import settings_for

pytestmark = pytest.mark.memcached


@pytest.fixture
def cache(memcached: Any, make_app: Any) -> Any:
    app: Flask = make_app(settings_for([memcached.address], refresh={"lock_lease": 5}))
    with app.app_context():
        swr: AppState = state_of(app)
        yield swr


def test_only_one_holder_and_release_frees_it_at_once(cache: AppState) -> None:
    first = cache.leases.acquire("k")
    assert first is not None
    assert cache.leases.acquire("k") is None            # add() fails while it is held
    assert cache.leases.holder("k") == first.token
    assert cache.leases.release(first)
    second = cache.leases.acquire("k")                  # no tombstone lingers after release
    assert second is not None and second.token != first.token
    assert cache.leases.release(second)


def test_a_holder_whose_lease_was_taken_over_cannot_release_or_renew_it(cache: AppState) -> None:
    old = cache.leases.acquire("k")
    assert old is not None
    cache.tiers.store.delete(lease_key("k"))            # lapsed / evicted
    new = cache.leases.acquire("k")
    assert new is not None
    assert not cache.leases.renew(old)
    assert not cache.leases.release(old)
    assert cache.leases.holder("k") == new.token        # the new holder keeps it
    assert cache.leases.renew(new)


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
