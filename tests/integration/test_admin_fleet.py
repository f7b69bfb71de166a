"""The admin across workers, and in a library app: two apps on one memcached and one key
prefix stand for two workers; the registry must make their answers the same."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from flask import Flask, jsonify, request

from service import SWR
from service.admin import routes as admin
from service.admin.registry import Registry, bucket_key
from service.flask.state import state_of
from service.readpath.freshness import Windows
from service.readpath.loader import Job
from tests.conftest import settings_for, stop_app

pytestmark = pytest.mark.memcached
TOKEN = "fleet-admin-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def library_app(memcached: Any, calls: dict[str, int]) -> Flask:
    """A user's own app: a decorated view and a memoized function, the admin mounted as
    the README says."""
    app = Flask("library_app")
    swr = SWR()

    @app.get("/report")
    @swr.cached(max_age=60, stale_while_revalidate=600)
    def report() -> Any:
        calls["report"] += 1
        return jsonify(n=calls["report"], region=request.args.get("region"))

    @swr.memoize(max_age=60, stale_while_revalidate=600)
    def square(x: int) -> int:
        calls["square"] += 1
        return x * x

    @app.get("/square/<int:x>")
    def square_view(x: int) -> Any:
        return jsonify(square(x))

    swr.init_app(app, settings_for([memcached.address], cache={"l1_ttl": 0.05}))
    app.register_blueprint(admin.bp)
    # What gunicorn's post_worker_init does: the refresher, and with it the reporter that
    # writes this worker's notes to the registry.
    state_of(app).refresher.start()
    return app


@pytest.fixture
def workers(memcached: Any, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[tuple[Flask, Flask, dict[str, int]]]:
    monkeypatch.setenv("SERVICE_ADMIN_TOKEN", TOKEN)
    calls = {"report": 0, "square": 0}
    first, second = library_app(memcached, calls), library_app(memcached, calls)
    yield first, second, calls
    stop_app(first)
    stop_app(second)


def listing(app: Flask, **query: Any) -> list[dict[str, Any]]:
    response = app.test_client().get("/admin/api/entries", headers=BEARER,
                                     query_string=query)
    assert response.status_code == 200, response.get_data(as_text=True)
    rows: list[dict[str, Any]] = response.get_json()["entries"]
    return rows


def wait_for_rows(app: Flask, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The listing once it has ``count`` rows: the other worker's reporter flushes its notes
    a moment after its load."""
    deadline = gevent.get_hub().loop.now() + timeout
    while True:
        rows = listing(app)
        if len(rows) >= count or gevent.get_hub().loop.now() > deadline:
            return rows
        gevent.sleep(0.05)


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # "tiers" says whether *the answering worker* has an L1 copy (the one worker-bound
    # column), and "age" grows between the two calls.
    return [{k: v for k, v in r.items() if k not in ("tiers", "age")} for r in rows]


def test_both_workers_list_the_same_entries(workers: Any) -> None:
    first, second, _calls = workers
    first.test_client().get("/report")
    first.test_client().get("/report?region=us")
    second.test_client().get("/square/3")
    rows = wait_for_rows(first, 3)
    assert comparable(rows) == comparable(listing(second))
    kinds = {(r["source"], r["kind"], str(r["params"])) for r in rows}
    assert kinds == {("report", "view", "{}"), ("report", "view", "{'region': 'us'}"),
                     ("square", "function", "None")}
    assert {r["state"] for r in rows} == {"fresh"}
    report = next(r for r in rows if r["source"] == "report" and not r["params"])
    assert report["tiers"] == ["memcached", "l1"]              # the first worker served it
    assert next(r for r in listing(second) if r["id"] == report["id"])["tiers"] == [
        "memcached"]


def test_the_page_and_the_api_work_in_a_library_app(workers: Any) -> None:
    first, _second, _calls = workers
    client = first.test_client()
    client.get("/report")
    page = client.get("/admin/", headers=BEARER)
    assert page.status_code == 200 and b"swr-cache admin" in page.data
    assert client.get("/admin/api/stats", headers=BEARER).status_code == 200
    sources = client.get("/admin/api/sources", headers=BEARER).get_json()
    assert {"name": "report", "kind": "view", "entries": 1} in sources


def test_row_invalidate_of_a_view_without_parameters_leaves_its_siblings(workers: Any) -> None:
    first, second, calls = workers
    a, b = first.test_client(), second.test_client()
    a.get("/report")
    a.get("/report?region=us")
    bare = next(r for r in wait_for_rows(second, 2) if r["source"] == "report" and not r["params"])
    response = b.delete(f"/admin/api/entries/{bare['id']}", headers=BEARER)
    assert response.status_code == 200
    states = {str(r["params"]): r["state"] for r in listing(first)}
    assert states == {"{}": "invalidated", "{'region': 'us'}": "fresh"}
    gevent.sleep(0.06)                                           # first's l1_ttl
    assert a.get("/report").headers["X-Cache"] == "MISS"
    assert a.get("/report?region=us").headers["X-Cache"] == "HIT"
    assert calls["report"] == 3


def test_invalidate_a_decorated_function_deletes_every_entry_of_it(workers: Any) -> None:
    first, second, calls = workers
    a = first.test_client()
    for x in (1, 2, 3):
        a.get(f"/square/{x}")
    a.get("/report")
    wait_for_rows(second, 4)
    response = second.test_client().delete("/admin/api/sources/square", headers=BEARER)
    assert response.status_code == 200 and response.get_json()["entries"] == 3
    states = {r["source"]: set() for r in listing(first)}
    for r in listing(first):
        states[r["source"]].add(r["state"])
    assert states == {"square": {"invalidated"}, "report": {"fresh"}}
    gevent.sleep(0.06)
    a.get("/square/2")
    assert calls["square"] == 4
    assert second.test_client().delete("/admin/api/sources/nothing",
                                       headers=BEARER).status_code == 404


def test_refresh_from_a_worker_that_never_served_the_key_marks_it_stale(workers: Any) -> None:
    first, second, calls = workers
    a = first.test_client()
    a.get("/report")
    [row] = wait_for_rows(second, 1)
    response = second.test_client().post(f"/admin/api/entries/{row['id']}/refresh",
                                         headers=BEARER)
    body = response.get_json()
    assert response.status_code == 202 and body["marked_stale"] is True
    assert "next read" in body["how"]
    assert listing(second)[0]["state"] == "stale"
    gevent.sleep(0.06)
    assert a.get("/report").headers["X-Cache"] == "STALE"        # served at once...
    assert state_of(first).refresher.join(timeout=10)             # ...refreshed behind
    assert calls["report"] == 2
    assert a.get("/report").headers["X-Cache"] == "HIT"
    # The worker that served it refreshes it itself.
    here = first.test_client().post(f"/admin/api/entries/{row['id']}/refresh",
                                    headers=BEARER)
    assert here.get_json()["scheduled"] is True
    assert state_of(first).refresher.join(timeout=10)
    assert calls["report"] == 3


def test_concurrent_flushes_of_many_workers_lose_no_note(memcached: Any, make_app: Any) -> None:
    apps = [make_app(settings_for([memcached.address])) for _ in range(4)]
    registries: list[Registry] = []
    for n, app in enumerate(apps):
        st = state_of(app)
        # One bucket: every flush contends on the same item.
        registry = Registry(st.store, st.tiers.local, st.clock, buckets=1, per_bucket=500)
        for i in range(25):
            registry.note(Job(f"k{n}-{i}", lambda: None, Windows(60), source=f"w{n}"), "ok",
                          st.clock())
        registries.append(registry)
    flushes = [gevent.spawn(r.flush) for r in registries]
    gevent.joinall(flushes, raise_error=True)
    assert all(g.value for g in flushes)
    stored = state_of(apps[0]).store.get(bucket_key(0))["r"]
    assert len(stored) == 100 and {r["s"] for r in stored.values()} == {"w0", "w1", "w2", "w3"}
