"""Issue 12: each defect the adversarial probe found, injected for real (real memcached
processes and signals, raw bytes written to memcached), and the fix that heals it."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from service.flask.state import state_of
from service.http.counters import usable
from service.readpath.entry import Entry
from service.readpath.freshness import Windows
from service.readpath.loader import Job
from tests import sources_fixtures
from tests.conftest import FakeClock, settings_for

pytestmark = pytest.mark.memcached


def counter(client: Any, name: str) -> tuple[int, Any]:
    answer = client.post(f"/v1/counters/{name}")
    return answer.status_code, answer.get_json()


@pytest.mark.private_memcached
def test_a_restarted_memcached_is_used_again_at_once_whatever_the_pool_size(
        memcached: Any, make_app: Any) -> None:
    app: Flask = make_app(settings_for([memcached.address], cache={"pool_size": 16}))
    client = app.test_client()
    pool = state_of(app).pool
    warm = [pool.acquire() for _ in range(16)]      # 16 warm connections, each used once
    for conn in warm:
        conn.call(memcached.address, "version", lambda c: c.version())
    for conn in warm:
        pool.release(conn)
    memcached.restart()                              # every one of those sockets is dead
    answers = [counter(client, "after-restart") for _ in range(20)]
    statuses = [status for status, _ in answers]
    first = next(body["value"] for status, body in answers if status == 200)
    # The first call on a dead socket fails; that failure retires every socket opened
    # before it, so the next calls reconnect: at most one 503, never an open circuit.
    assert statuses.count(503) <= 1 and statuses[-1] == 200
    assert pool.breakers[memcached.address].state(pool.monotonic()) == "closed"
    status, body = counter(client, "after-restart")   # consecutive from where it started
    assert status == 200 and body["value"] == first + statuses.count(200)


@pytest.mark.private_memcached
def test_a_frozen_memcached_is_used_again_as_soon_as_it_thaws(
        memcached: Any, make_app: Any, clock: FakeClock) -> None:
    app: Flask = make_app(settings_for([memcached.address]))
    client = app.test_client()
    pool = state_of(app).pool
    pool.monotonic = clock                           # the breaker's cool-down
    assert counter(client, "frozen")[0] == 200
    memcached.freeze()
    try:
        statuses = [counter(client, "frozen")[0] for _ in range(5)]
        assert set(statuses) == {503}                # timeouts, then the open circuit
        assert pool.breakers[memcached.address].state(clock()) == "open"
    finally:
        memcached.thaw()
    clock.advance(0.6)                               # one cool-down (circuit_reset 0.5 s)
    status, body = counter(client, "frozen")
    # Used again at once. (The increments that timed out were queued by the frozen
    # server and applied when it thawed: memcached's, not ours to undo.)
    assert status == 200 and body["value"] >= 2


def test_garbage_under_a_counter_heals_and_never_opens_the_circuit(
        memcached: Any, make_app: Any) -> None:
    app: Flask = make_app(settings_for([memcached.address]))
    client = app.test_client()
    store = state_of(app).store
    memcached.raw_set(store.child("counter").key("poisoned"), b"not a number")
    status, body = counter(client, "poisoned")
    assert status == 200 and usable(body["value"])
    statuses = [counter(client, "unrelated")[0] for _ in range(40)]
    assert set(statuses) == {200}
    pool = state_of(app).pool
    assert pool.breakers[memcached.address].state(pool.monotonic()) == "closed"


@pytest.mark.parametrize("garbage", [
    b"\x80\x04\x95 not ours at all",                      # another program's pickle
    b"\x00sw\x01j{\"env\": 1, \"value\": 1}",              # our header, not an envelope
    b"\x00sw\x01c{\"id\": \"x\", \"n\": 2, \"len\": 9, \"sha256\": \"00\"}",  # lost chunks
])
def test_an_unusable_item_is_replaced_by_the_next_fetch(
        memcached: Any, make_app: Any, garbage: bytes) -> None:
    app: Flask = make_app(settings_for([memcached.address], cache={"l1_max_entries": 0}))
    state = state_of(app)
    memcached.raw_set(state.store.key("k"), garbage, exptime=0)   # exptime 0: forever
    calls = []

    def fetch() -> str:
        calls.append(1)
        return "fresh"

    job = Job("k", fetch, Windows(60), source="test")
    with app.app_context():
        assert state.region.get_or_load(job).status == "MISS"
        again = state.region.get_or_load(job)
    assert (again.status, again.value, len(calls)) == ("HIT", "fresh", 1)  # healed
    raw, _ = state.store.gets("k")
    assert Entry.from_wire(raw).value == "fresh"


@pytest.mark.private_memcached
def test_an_invalidation_survives_a_restart_of_the_server_with_the_generation(
        memcached_factory: Any, make_app: Any, origin_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVICE_ADMIN_TOKEN", "t")
    servers = [memcached_factory(), memcached_factory()]
    app: Flask = make_app(settings_for(
        [s.address for s in servers], cache={"l1_ttl": 0.0, "l1_max_entries": 0},
        sources={"items": {"kind": "http", "url": origin_server.url + "/items?id={id}",
                           "max_age": 600}}))
    client = app.test_client()
    bearer = {"Authorization": "Bearer t"}
    bodies = {i: client.get(f"/v1/items?id={i}").data for i in range(16)}
    assert client.delete("/admin/api/sources/items", headers=bearer).status_code == 200
    refreshed = {i: client.get(f"/v1/items?id={i}").data for i in range(16)}
    pool = state_of(app).pool
    gen_server = pool.server_for(state_of(app).store.child("gen").key("items"))
    holder = next(s for s in servers if s.address == gen_server)

    holder.restart()                                  # the generation counter is gone
    pool.breakers[gen_server].record_success()
    # This worker knew the current generation, but never puts a remembered number back
    # (it may predate a bump it missed): the counter restarts at a number never used, so
    # every entry is fetched anew, and not one body from before the invalidation comes back.
    for _ in range(2):        # the first call meets the dead socket, the next reconnects
        after = {i: client.get(f"/v1/items?id={i}") for i in range(16)}
    assert all(a.data != bodies[i] for i, a in after.items())
    assert all(a.headers["X-Cache"] == "MISS" or a.data != refreshed[i]
               for i, a in after.items())

    holder.restart()                                  # again, seen by a worker that
    pool.breakers[gen_server].record_success()
    state_of(app).generations.forget_known()          # knows no generation (a new one)
    again = {i: client.get(f"/v1/items?id={i}") for i in range(16)}
    # It starts afresh: every entry is fetched anew, none from before comes back.
    assert all(a.headers["X-Cache"] == "MISS" for a in again.values())
    assert all(a.data not in (bodies[i], refreshed[i]) for i, a in again.items())


@pytest.mark.parametrize("value", ["..", "."])
def test_dot_segments_in_a_path_placeholder_are_refused(
        memcached: Any, make_app: Any, origin_server: Any, value: str) -> None:
    app: Flask = make_app(settings_for([memcached.address], sources={
        "item": {"kind": "http", "url": origin_server.url + "/items/{id}/detail?q={q}",
                 "max_age": 60}}))
    client = app.test_client()
    answer = client.get("/v1/item", query_string={"id": value, "q": "x"})
    assert answer.status_code == 400 and "'id'" in answer.get_json()["detail"]
    assert origin_server.count() == 0
    # In the query part the same values are just text, encoded.
    assert client.get("/v1/item", query_string={"id": "7", "q": ".."}).status_code == 200


@pytest.mark.private_memcached
def test_a_flushed_memcached_and_a_failing_origin_still_serve_the_local_copy(
        memcached: Any, make_app: Any, clock: FakeClock) -> None:
    app: Flask = make_app(settings_for([memcached.address], refresh={"error_ttl": 0}),
                          clock=clock)
    state = state_of(app)
    failing = {"on": False}

    def fetch() -> str:
        if failing["on"]:
            raise RuntimeError("origin answers 500")
        return "good copy"

    job = Job("k", fetch, Windows(60, 600, 3600), source="test")
    with app.app_context():
        assert state.region.get_or_load(job).value == "good copy"
        memcached.flush()                             # memcached lost every entry
        failing["on"] = True
        clock.advance(5)                              # past l1_ttl: memcached is asked
        answers = [state.region.get_or_load(job) for _ in range(20)]
    assert {(a.status, a.value) for a in answers} == {("STALE", "good copy")}


def test_an_entry_one_worker_invalidated_is_not_served_by_another_when_the_origin_fails(
        memcached: Any, make_app: Any, clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The flushed-memcached case above serves the local copy; an invalidation must not.
    monkeypatch.setenv("SERVICE_ADMIN_TOKEN", "s3cret")
    settings = settings_for([memcached.address], refresh={"error_ttl": 0}, sources={
        "flaky": {"kind": "python", "target": "tests.sources_fixtures:flaky",
                  "max_age": 60, "stale_if_error": 3600}})
    first, second = (make_app(settings, clock=clock).test_client() for _ in range(2))
    assert first.get("/v1/flaky?id=1").headers["X-Cache"] == "MISS"
    assert second.get("/v1/flaky?id=1").headers["X-Cache"] == "HIT"  # a copy of its own
    clock.advance(1)
    gone = first.delete("/admin/api/sources/flaky?id=1",
                        headers={"Authorization": "Bearer s3cret"})
    assert gone.status_code == 200, gone.get_data(as_text=True)
    monkeypatch.setitem(sources_fixtures.FLAKY, "failing", True)
    clock.advance(5)                                   # past l1_ttl: memcached is asked
    answer = second.get("/v1/flaky?id=1")
    assert answer.status_code == 502, answer.get_data(as_text=True)
    assert first.get("/v1/flaky?id=1").status_code == 502


def test_an_answer_over_max_body_bytes_is_a_clear_502(
        memcached: Any, make_app: Any, origin_server: Any) -> None:
    app: Flask = make_app(settings_for([memcached.address], sources={
        "big": {"kind": "http", "url": origin_server.url + "/big?size={size}",
                "max_age": 60, "max_body_bytes": 1000}}))
    client = app.test_client()
    assert client.get("/v1/big?size=1000").status_code == 200
    over = client.get("/v1/big?size=5000000")
    assert over.status_code == 502
    assert "max_body_bytes" in over.get_json()["detail"]


def test_error_details_name_neither_the_origin_nor_the_parameters(
        memcached: Any, make_app: Any) -> None:
    from tests.servers import free_port

    port = free_port()
    app: Flask = make_app(settings_for([memcached.address], sources={
        "gone": {"kind": "http", "url": f"http://127.0.0.1:{port}/x?secret={{secret}}",
                 "max_age": 60}}))
    answer = app.test_client().get("/v1/gone?secret=hunter2")
    assert answer.status_code == 502
    detail = answer.get_json()["detail"]
    assert str(port) not in detail and "127.0.0.1" not in detail and "hunter2" not in detail


def rewrite_stored_envelope(memcached: Any, make_app: Any, origin_server: Any,
                            field: str, value: Any) -> tuple[Any, Any, Any]:
    """Read /v1/items?id=1 once, then rewrite one field of its stored envelope: the
    client, the first answer and the answer after the rewrite."""
    app: Flask = make_app(settings_for([memcached.address], cache={"l1_max_entries": 0},
                                       sources={"items": {
                                           "kind": "http", "max_age": 60,
                                           "url": origin_server.url + "/items?id={id}"}}))
    client = app.test_client()
    first = client.get("/v1/items?id=1")
    state = state_of(app)
    key = next(k for k, _ in state.ledger.items())
    raw, _ = state.store.gets(key)
    raw[field] = value
    state.store.set(key, raw, 60)
    return client, first, client.get("/v1/items?id=1")


@pytest.mark.parametrize("value", [
    {"status": "200", "content_type": "text/plain", "body": b"x"},       # a string status
    {"status": 200, "content_type": "text/plain\r\nSet-Cookie: a=b", "body": b"x"},
    {"status": 200, "content_type": "text/plain", "body": "not bytes"},
    ["not", "a", "dict"],
])
def test_a_hostile_envelope_is_replaced_not_rendered(
        memcached: Any, make_app: Any, origin_server: Any, value: Any) -> None:
    # A well-formed envelope with a hostile field.
    client, first, again = rewrite_stored_envelope(memcached, make_app, origin_server,
                                                   "value", value)
    assert again.status_code == 200 and again.data != first.data   # fetched anew
    assert origin_server.count("/items") == 2
    assert client.get("/v1/items?id=1").headers["X-Cache"] == "HIT"   # healed


def test_the_table_of_failing_keys_is_bounded(make_app: Any, memcached: Any) -> None:
    from service.readpath import refresher as refresher_module

    app: Flask = make_app(settings_for([memcached.address]))
    state = state_of(app)
    limit = refresher_module.MAX_FAILING_KEYS
    refresher_module.MAX_FAILING_KEYS = 50
    try:
        def fail() -> None:
            raise RuntimeError("down")
        for i in range(200):
            state.refresher.schedule(f"k{i}", fail)
            assert state.refresher.join(timeout=5)
        assert len(state.refresher._failures) == 50
    finally:
        refresher_module.MAX_FAILING_KEYS = limit


def test_readyz_answers_503_once_the_worker_is_told_to_stop(
        make_app: Any, memcached: Any) -> None:
    from service.gunicorn.worker import readiness_off

    app: Flask = make_app(settings_for([memcached.address]))
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    seen: list[int] = []
    handler = readiness_off(state_of(app), lambda signum, frame: seen.append(signum))
    handler(15, None)                                  # what SIGTERM runs in a worker
    assert client.get("/readyz").status_code == 503 and seen == [15]


def test_a_trickling_origin_is_cut_at_fetch_timeout(
        memcached: Any, make_app: Any, origin_server: Any) -> None:
    # Headers at once, then one byte every 0.2 s: every read returns in time, so only a
    # bound on the whole fetch, enforced from outside, stops it.
    app: Flask = make_app(settings_for([memcached.address], refresh={"fetch_timeout": 1.0},
                                       sources={"slow": {
                                           "kind": "http", "max_age": 60,
                                           "url": origin_server.url + "/t?trickle=0.2&size={n}"}}))
    answer = app.test_client().get("/v1/slow?n=100")
    assert answer.status_code == 504


@pytest.mark.parametrize("record", ["claim", "error", "lease"])
def test_a_claim_or_record_without_expiry_heals_with_one_fetch(
        memcached: Any, make_app: Any, record: str) -> None:
    from service.errors import OriginError
    from service.memcache import codec
    from service.readpath.lease import error_record

    app: Flask = make_app(settings_for([memcached.address], refresh={"lock_lease": 2}))
    state = state_of(app)
    # Every claim and record the service writes expires; each of these, stored forever
    # by somebody else, would otherwise make readers wait, or answer 502, for ever.
    if record == "claim":       # an empty item nobody vivified
        memcached.raw_set(state.store.key("k"), b"", exptime=0)
    elif record == "error":     # a remembered 502 that never ends
        memcached.raw_set(state.store.key("k"),
                          codec.encode(error_record(OriginError("stuck"))), exptime=0)
    else:                       # a lease beside garbage, held for ever by nobody
        memcached.raw_set(state.store.key("k"), b"garbage", exptime=0)
        memcached.raw_set(state.store.child("lease").key("k"), codec.encode("some-host:1:abc"),
                          exptime=0)
    calls = []

    def fetch() -> str:
        calls.append(1)
        return "fresh"

    job = Job("k", fetch, Windows(60), source="test")
    with app.app_context():
        first = state.region.get_or_load(job)
        second = state.region.get_or_load(job)
    assert (first.status, first.value) == ("MISS", "fresh")
    assert second.status == "HIT" and calls == [1]


@pytest.mark.parametrize("field, number", [("max_age", float("inf")), ("stored_at", 9e18),
                                           ("swr", float("nan")), ("fetch", -5)])
def test_an_envelope_with_a_hostile_number_is_replaced_not_a_500(
        memcached: Any, make_app: Any, origin_server: Any, field: str, number: float) -> None:
    # A number that parses, but is absurd.
    client, first, again = rewrite_stored_envelope(memcached, make_app, origin_server,
                                                   field, number)
    assert again.status_code == 200 and again.data != first.data   # fetched anew
    assert client.get("/v1/items?id=1").headers["X-Cache"] == "HIT"   # healed
