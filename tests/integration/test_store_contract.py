"""One store contract, run against memcached (service.memcache.store.Store) and the
in-memory stand-in the unit tests use (tests.memstore.MemoryStore): the unit tests of the
read path are only as true as the stand-in's answers, so each answer the read path relies
on is checked here against the real thing, side by side."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from service.memcache.store import EMPTY, MISS
from service.readpath.lease import PASS_RECORD
from tests.conftest import settings_for
from tests.memstore import MemoryStore

pytestmark = pytest.mark.memcached


@pytest.fixture(params=["memcached", "memory"])
def store(request: pytest.FixtureRequest, memcached: Any, make_app: Any) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryStore(time.time)
        return
    from service.flask.state import state_of

    app = make_app(settings_for([memcached.address]))
    yield state_of(app).store


def test_a_missing_key_is_won_once_and_held_for_the_others(store: Any) -> None:
    first = store.mget("k", vivify=5)
    assert first.won and first.value is EMPTY and first.cas is not None
    second = store.mget("k", vivify=5)
    assert not second.won and second.value is EMPTY and second.cas == first.cas
    assert store.mget("absent").value is MISS            # no vivify: nothing created


def test_a_fenced_write_answers_hd_ex_and_nf(store: Any) -> None:
    fence = store.mget("k", vivify=5).cas
    stored = store.mset("k", "v1", 60, cas=fence)
    assert stored.code == "HD"
    assert store.mset("k", "v0", 60, cas=fence).code == "EX"    # changed since
    store.mdelete("k")
    assert store.mset("k", "late", 60, cas=fence).code == "NF"  # gone: never an add
    assert store.mget("k").value is MISS


def test_add_and_compare_and_delete(store: Any) -> None:
    assert store.mset("k", "a", 60, add=True).code == "HD"
    assert store.mset("k", "b", 60, add=True).code == "NS"
    got = store.mget("k")
    assert got.value == "a" and got.ttl is not None and 0 < got.ttl <= 60
    assert store.mdelete("k", b"999999999") == "EX"
    assert store.mdelete("k", got.cas) == "HD"
    assert store.mdelete("k") == "NF"


def test_records_round_trip_and_a_claim_is_renewed_only_by_its_owner(store: Any) -> None:
    won = store.mget("k", vivify=5)
    assert store.touch_if("k", won.cas, 10)
    assert not store.touch_if("k", b"1", 10)
    assert store.mset("k", PASS_RECORD, 5, cas=won.cas).ok
    assert store.mget("k").value == PASS_RECORD
    assert not store.touch_if("k", won.cas, 10)          # no longer an empty claim


def test_families_are_apart_from_the_store_and_from_each_other(store: Any) -> None:
    lease, marks = store.child("lease", follow=True), store.child("forgot", follow=True)
    store.set("k", "entry")
    lease.set("k", "holder")
    marks.set("k", "epoch")
    assert (store.get("k"), lease.get("k"), marks.get("k")) == ("entry", "holder", "epoch")
    store.delete("k")
    assert lease.get("k") == "holder"                    # a delete of the entry alone
    assert store.get("lease\x00k") is MISS               # a public key names no family's


def test_concurrent_claims_of_one_key_have_one_winner(store: Any) -> None:
    got = [g.get(timeout=5) for g in [gevent.spawn(store.mget, "k", 5) for _ in range(10)]]
    assert sum(1 for r in got if r.won) == 1
