"""Every memcached command the service sends, through twemproxy (``deploy/twemproxy.yml``
in front of three memcached servers), the service pointed at the proxy as its one server.

The commands, what uses them, and twemproxy 0.5.0 (the table is in deploy/README.md too):

- ``get``/``gets``, one key or several (split by server): entries, CAS tokens, waiters'
  polls, chunks of large values. Forwarded.
- ``set``, also several pipelined: ``cache.set``, chunks. Forwarded.
- ``add``: lease acquire, the fenced first write, counter creation. Forwarded.
- ``cas``: fenced writes, lease renewal, ``increment`` below zero. Forwarded.
- ``delete``: invalidation. ``incr``/``decr``: counters, source generations. Forwarded.
- ``version``: ``/readyz``. Answered (by one of the servers).
- meta ``md <key> C<cas>``: lease release. **Refused** (the proxy closes the connection):
  the store detects it once per pool and falls back to ``cas`` with an expiry in the past.
- Not used by the service: ``touch`` (forwarded), ``gat``, ``stats``, ``flush_all`` (refused).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from service.flask.state import AppState, state_of
from service.memcache.store import MISS
from service.observe import metrics
from tests.conftest import settings_for
from tests.servers import MemcachedFactory, TwemproxyFactory, TwemproxyProcess

pytestmark = pytest.mark.memcached


@pytest.fixture
def proxy(memcached_factory: MemcachedFactory,
          twemproxy_factory: TwemproxyFactory) -> TwemproxyProcess:
    servers = [memcached_factory() for _ in range(3)]
    return twemproxy_factory([s.address for s in servers])


@pytest.fixture
def cache(proxy: TwemproxyProcess, make_app: Any) -> Iterator[AppState]:
    app: Flask = make_app(settings_for([proxy.address], refresh={"lock_lease": 5}))
    with app.app_context():
        yield state_of(app)


def calls(command: str) -> float:
    total = 0.0
    for metric in metrics.memcached_call_seconds.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels.get("command") == command:
                total += sample.value
    return total


def breaker_state(cache: AppState) -> str:
    (breaker,) = cache.pool.breakers.values()
    return breaker.state(cache.pool.monotonic())


def test_the_proxy_refuses_meta_commands_and_forwards_the_classic_ones(
    proxy: TwemproxyProcess
) -> None:
    # What the fallback is for: twemproxy does not parse the meta protocol and drops the
    # connection; a negative exptime is refused the same way.
    assert proxy.command_line(b"md somekey C1") == b""
    assert proxy.command_line(b"set neg 0 -1 1\r\nx") == b""
    assert proxy.command_line(b"set pos 0 0 1\r\nx") == b"STORED"
    assert proxy.command_line(b"touch pos 10") == b"TOUCHED"
    assert proxy.command_line(b"version").startswith(b"VERSION")


def test_reads_writes_and_fences_through_the_proxy(cache: AppState) -> None:
    store = cache.store
    keys = [f"k{i}" for i in range(12)]                 # spread over the three servers
    assert store.set_many({k: {"n": i} for i, k in enumerate(keys)}, ttl=60) == keys
    assert store.get_many(keys) == {k: {"n": i} for i, k in enumerate(keys)}
    assert store.set("one", [1, 2], ttl=60)
    assert store.get("one") == [1, 2]

    value, token = store.gets("one")
    assert value == [1, 2] and token is not None
    assert store.cas("one", [3], token, ttl=60) is True
    assert store.cas("one", [4], token, ttl=60) is False    # stale token: fenced
    assert store.cas("absent", [5], b"1", ttl=60) is None
    assert store.add("one", "x") is False                  # exists
    assert store.add("fresh", "x") is True
    assert store.delete("fresh") is True
    assert store.get("fresh") is MISS

    big = b"x" * (3 * 1024 * 1024)                        # chunked over several items
    assert store.set("big", big, ttl=60)
    assert store.get("big") == big
    assert breaker_state(cache) == "closed"


def test_counters_through_the_proxy(cache: AppState) -> None:
    store = cache.store
    assert store.incr("c") is None                         # absent
    assert store.add_counter("c", 0)
    assert [store.incr("c") for _ in range(3)] == [1, 2, 3]
    assert store.decr("c") == 2
    assert store.increment("c", -5) == -3                  # gets/cas below zero
    assert store.increment("c", 4) == 1


def test_lease_release_falls_back_once_without_opening_the_circuit(
    cache: AppState, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="service.memcache.store")
    ms_before = calls("ms")
    leases = cache.leases
    for round_ in range(5):
        lease = leases.acquire("k", None)
        assert lease is not None, f"round {round_}: the released lease lingered"
        assert leases.acquire("k", None) is None           # held
        assert leases.release(lease) is True               # and really gone at once:
    assert leases.holder("k") is None
    assert calls("ms") == ms_before + 2      # tried twice (once on a fresh socket), then remembered
    assert caplog.text.count("does not accept meta commands") == 1
    assert breaker_state(cache) == "closed"                # one refused command is no outage


def test_compare_and_delete_through_the_proxy_spares_a_newer_value(
    cache: AppState, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = cache.tiers.store
    store.set("x", "token-a")
    assert store.delete_if("x", "token-a") is True         # the detection round
    store.set("x", "token-a")
    read = store.gets

    def gets_then_someone_writes(key: str) -> Any:
        result = read(key)
        store.set(key, "token-a")                          # same bytes, new CAS token
        return result

    monkeypatch.setattr(store, "gets", gets_then_someone_writes)
    assert store.delete_if("x", "token-a") is False
    monkeypatch.undo()
    assert store.get("x") == "token-a"
    assert store.delete_if("x", "other") is False
    assert store.delete_if("x", "token-a") is True
    assert store.get("x") is MISS


def test_readiness_through_the_proxy(proxy: TwemproxyProcess, make_app: Any) -> None:
    app: Flask = make_app(settings_for([proxy.address]))
    answer = app.test_client().get("/readyz")
    assert answer.status_code == 200
    assert answer.get_json()["status"] == "ok"
