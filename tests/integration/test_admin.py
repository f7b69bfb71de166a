"""The admin API of the service app: authentication, CSRF, the session cookie, stats,
entries (filters, pagination, live state), invalidate and refresh, the audit log."""

from __future__ import annotations

import base64
import os
import socket
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.admin.routes import COOKIE, csrf_token
from service.flask.state import state_of
from service.memcache.keys import digest
from service.observe import monitor
from tests.conftest import settings_for

pytestmark = pytest.mark.memcached
TOKEN = "s3cret-admin-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def basic(password: str) -> dict[str, str]:
    raw = base64.b64encode(f"admin:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


@pytest.fixture
def admin_app(memcached: Any, origin_server: Any, make_app: Any,
              monkeypatch: pytest.MonkeyPatch) -> Flask:
    monkeypatch.setenv("SERVICE_ADMIN_TOKEN", TOKEN)
    app: Flask = make_app(settings_for([memcached.address], sources={
        "items": {"kind": "http", "url": origin_server.url + "/items?id={id}", "max_age": 60,
                  "stale_while_revalidate": 600},
        "fixed": {"kind": "http", "url": origin_server.url + "/fixed", "max_age": 60},
        "broken": {"kind": "http", "url": origin_server.url + "/broken?status=503",
                   "max_age": 60},
    }))
    return app


def read(client: FlaskClient, **params: str) -> Any:
    return client.get("/v1/items", query_string=params)


def entries(client: FlaskClient, **query: Any) -> dict[str, Any]:
    response = client.get("/admin/api/entries", headers=BEARER, query_string=query)
    assert response.status_code == 200, response.get_data(as_text=True)
    listing: dict[str, Any] = response.get_json()
    return listing


def by_params(listing: dict[str, Any], source: str = "items") -> dict[Any, dict[str, Any]]:
    return {tuple(sorted((e["params"] or {}).items())): e for e in listing["entries"]
            if e["source"] == source}


def test_admin_is_404_without_a_configured_token(memcached: Any, make_app: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVICE_ADMIN_TOKEN", raising=False)
    client = make_app(settings_for([memcached.address])).test_client()
    for path in ("/admin/", "/admin/api/stats", "/admin/api/entries"):
        assert client.get(path, headers=BEARER).status_code == 404


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, basic("wrong"),
                                     {"Authorization": f"Bearer {TOKEN}x"},
                                     {"Cookie": f"{COOKIE}=9999999999.forged"}])
def test_wrong_or_missing_credentials_are_401(admin_app: Flask,
                                              headers: dict[str, str]) -> None:
    response = admin_app.test_client().get("/admin/api/stats", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")


def test_stats_per_source_tier_and_memcached_server(admin_app: Flask) -> None:
    client = admin_app.test_client()

    def items_stats() -> dict[str, Any]:
        stats = client.get("/admin/api/stats", headers=BEARER).get_json()
        found: dict[str, Any] = stats["sources"].get("items") or {
            "requests": {"hit": 0, "stale": 0, "miss": 0, "total": 0},
            "refreshes": {}, "refresh_seconds": {"count": 0}}
        return found

    # The counters are the process's (every test's): compare what these reads added.
    before = items_stats()
    read(client, id="1")
    read(client, id="1")
    read(client, id="2")
    stats = client.get("/admin/api/stats", headers=BEARER).get_json()
    items = stats["sources"]["items"]
    added = {k: items["requests"][k] - before["requests"].get(k, 0)
             for k in ("hit", "stale", "miss")}
    assert added == {"hit": 1, "stale": 0, "miss": 2}
    assert items["requests"]["total"] == sum(items["requests"][k] for k in
                                             ("hit", "stale", "miss"))
    assert 0 < items["ratios"]["hit"] < 1
    assert items["refreshes"]["ok"] - before["refreshes"].get("ok", 0) == 2
    timing = items["refresh_seconds"]
    assert timing["count"] - before["refresh_seconds"].get("count", 0) == 2
    assert 0 < timing["p50"] <= timing["p90"] <= timing["p99"]
    assert "l1" in stats["tiers"] and set(stats["tiers"]) <= {"l1", "memcached"}
    [server] = stats["servers"]
    assert server["up"] is True and server["breaker"] == "closed"
    assert server["curr_items"] >= 1 and 0 < server["memory_used"] < 1
    assert server["limit_maxbytes"] > server["bytes"] > 0
    assert 0 <= server["hit_ratio"] <= 1 and server["curr_connections"] >= 1
    assert sum(stats["history"]["series"]["miss"]) >= 2        # this worker reported them
    assert len(stats["history"]["minutes"]) == 60
    assert stats["errors"] == [] and isinstance(stats["hub"], list)


def test_entries_show_state_expiries_size_etag_tiers_and_last_fetch(admin_app: Flask) -> None:
    client = admin_app.test_client()
    etag = read(client, id="1").headers["ETag"]
    listing = entries(client)
    assert listing["scope"] == "fleet" and "at most 4096 keys" in listing["completeness"]
    first = by_params(listing)[(("id", "1"),)]
    assert first["state"] == "fresh" and first["in_memcached"] is True
    assert first["tiers"] == ["memcached", "l1"]
    assert first["etag"] == etag and first["size"] > 0
    assert first["last_refresh"] == "ok" and first["lease_holder"] is None
    assert first["last_by"] == {"host": socket.gethostname(), "pid": os.getpid()}
    assert first["fresh_until"] < first["stale_until"] <= first["error_until"]
    assert 0 <= first["age"] < 5 and first["kind"] == "source"
    assert first["id"] == digest(first["key"])


def test_a_held_lease_names_its_holder(admin_app: Flask) -> None:
    client = admin_app.test_client()
    read(client, id="5")
    row = by_params(entries(client))[(("id", "5"),)]
    lease = state_of(admin_app).leases.acquire(row["key"], None)
    assert lease is not None
    try:
        row = by_params(entries(client))[(("id", "5"),)]
        assert row["lease_holder"] == {"host": socket.gethostname(), "pid": os.getpid()}
    finally:
        state_of(admin_app).leases.release(lease)


def test_entries_filter_by_source_state_and_text_and_paginate(admin_app: Flask) -> None:
    client = admin_app.test_client()
    for i in range(5):
        read(client, id=str(i))
    client.get("/v1/fixed")
    assert entries(client)["total"] == 6
    assert entries(client, source="fixed")["total"] == 1
    assert entries(client, source="items")["total"] == 5
    assert entries(client, q="ID=3")["total"] == 1                  # case-insensitive text
    assert entries(client, state="fresh")["total"] == 6
    assert entries(client, state="stale")["total"] == 0
    pages = [entries(client, source="items", limit=2, offset=o) for o in (0, 2, 4)]
    assert [len(p["entries"]) for p in pages] == [2, 2, 1]
    assert len({e["key"] for p in pages for e in p["entries"]}) == 5
    assert client.get("/admin/api/entries?state=nope", headers=BEARER).status_code == 400
    assert client.get("/admin/api/entries?limit=x", headers=BEARER).status_code == 400


def test_invalidate_one_entry_then_a_whole_source(admin_app: Flask, origin_server: Any) -> None:
    client = admin_app.test_client()
    read(client, id="1")
    read(client, id="2")
    assert origin_server.count("/items") == 2
    gone = client.delete("/admin/api/sources/items?id=1", headers=BEARER)
    assert gone.get_json()["invalidated"] == "entry"
    rows = by_params(entries(client))
    assert rows[(("id", "1"),)]["state"] == "invalidated"
    assert rows[(("id", "2"),)]["state"] == "fresh"
    assert read(client, id="1").headers["X-Cache"] == "MISS"
    assert read(client, id="2").headers["X-Cache"] == "HIT"
    assert by_params(entries(client))[(("id", "1"),)]["state"] == "fresh"   # loaded again
    whole = client.delete("/admin/api/sources/items", headers=BEARER)
    assert whole.status_code == 200 and whole.get_json()["entries"] == 2
    assert {e["state"] for e in entries(client, source="items")["entries"]} == {"invalidated"}
    assert read(client, id="2").headers["X-Cache"] == "MISS"      # new generation
    assert origin_server.count("/items") == 4
    assert client.delete("/admin/api/sources/nope", headers=BEARER).status_code == 404
    assert client.delete("/admin/api/sources/items?bogus=1",
                         headers=BEARER).status_code == 400


def test_row_invalidate_of_an_entry_without_parameters_touches_only_it(
        admin_app: Flask) -> None:
    client = admin_app.test_client()
    client.get("/v1/fixed")
    read(client, id="1")
    fixed = by_params(entries(client), "fixed")[()]
    response = client.delete(f"/admin/api/entries/{fixed['id']}", headers=BEARER)
    assert response.status_code == 200 and response.get_json()["invalidated"] == "entry"
    assert by_params(entries(client), "fixed")[()]["state"] == "invalidated"
    assert by_params(entries(client))[(("id", "1"),)]["state"] == "fresh"
    assert client.get("/v1/fixed").headers["X-Cache"] == "MISS"
    assert read(client, id="1").headers["X-Cache"] == "HIT"
    assert client.delete("/admin/api/entries/nope", headers=BEARER).status_code == 404


def test_refresh_runs_in_the_background(admin_app: Flask, origin_server: Any) -> None:
    client = admin_app.test_client()
    read(client, id="7")
    response = client.post("/admin/api/sources/items/refresh?id=7", headers=BEARER)
    assert response.status_code == 202 and response.get_json()["scheduled"] is True
    assert state_of(admin_app).refresher.join(timeout=10)
    assert origin_server.count("/items") == 2
    row = by_params(entries(client))[(("id", "7"),)]
    by_id = client.post(f"/admin/api/entries/{row['id']}/refresh", headers=BEARER)
    assert by_id.status_code == 202 and by_id.get_json()["scheduled"] is True
    assert state_of(admin_app).refresher.join(timeout=10)
    assert origin_server.count("/items") == 3
    assert read(client, id="7").headers["X-Cache"] == "HIT"


def test_browser_requests_need_the_csrf_token_and_the_same_origin(admin_app: Flask) -> None:
    client = admin_app.test_client()
    read(client, id="1")
    page = client.get("/admin/", headers=basic(TOKEN))
    assert page.status_code == 200 and b"swr-cache admin" in page.data
    session = client.get_cookie(COOKIE, path="/admin/").value
    assert csrf_token(TOKEN, session).encode() in page.data
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "script-src 'nonce-" in page.headers["Content-Security-Policy"]
    url = "/admin/api/sources/items?id=1"
    assert client.delete(url, headers=basic(TOKEN)).status_code == 403
    assert client.delete(url, headers={**basic(TOKEN), "X-CSRF-Token": "nope"}).status_code == 403
    ok = client.delete(url, headers={**basic(TOKEN),
                                     "X-CSRF-Token": csrf_token(TOKEN, session)})
    assert ok.status_code == 200
    evil = client.get("/admin/api/stats", headers={**BEARER, "Origin": "https://evil.example"})
    assert evil.status_code == 403


def test_the_page_sets_a_session_cookie_that_needs_csrf_to_mutate(admin_app: Flask) -> None:
    client = admin_app.test_client()
    page = client.get("/admin/", headers=basic(TOKEN))
    cookie = page.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie and "Path=/admin/" in cookie
    # The cookie alone now authenticates reads (the page's fetch() calls carry no header)...
    assert client.get("/admin/api/stats").status_code == 200
    # ...but a mutation needs the CSRF token too.
    url = "/admin/api/sources/items?id=1"
    assert client.delete(url).status_code == 403
    session = client.get_cookie(COOKIE, path="/admin/").value
    assert client.delete(url, headers={"X-CSRF-Token": csrf_token(TOKEN, session)}
                         ).status_code == 200


def test_admin_actions_are_logged_as_events(admin_app: Flask,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="service")
    client = admin_app.test_client()
    client.delete("/admin/api/sources/items?id=3", headers=BEARER)
    read(client, id="4")
    row = by_params(entries(client))[(("id", "4"),)]
    client.delete(f"/admin/api/entries/{row['id']}", headers=BEARER)
    client.post(f"/admin/api/entries/{row['id']}/refresh", headers=BEARER)
    actions = [r for r in caplog.records if getattr(r, "event", None) == "admin"]
    assert [a.action for a in actions] == ["invalidate", "invalidate", "refresh"]
    assert actions[0].source == "items" and len(actions[0].key) == 16
    assert actions[1].key == actions[2].key != actions[0].key
    assert all(a.who == "bearer" and a.remote == "127.0.0.1" for a in actions)
    # The message alone says what, on what and by whom (an app without a logging config
    # prints nothing else).
    assert [a.getMessage() for a in actions] == [
        f"admin: invalidated items (key {actions[0].key}) by bearer from 127.0.0.1",
        f"admin: invalidated items (key {actions[1].key}) by bearer from 127.0.0.1",
        f"admin: refresh requested items (key {actions[1].key}) by bearer from 127.0.0.1"]


def test_stats_show_the_fleets_latest_fetch_errors_and_hub_blocks(
        admin_app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    client = admin_app.test_client()
    assert client.get("/v1/broken").status_code == 502
    monkeypatch.setattr(monitor, "recent", type(monitor.recent)(maxlen=20))
    monitor.recent.append({"at": 1.0e9, "seconds": 0.4, "greenlet": "<Greenlet busy>",
                           "stack": "  File \"x.py\", line 1, in busy"})
    stats = client.get("/admin/api/stats", headers=BEARER).get_json()
    [error] = stats["errors"]
    assert error["s"] == "broken" and error["o"] == "error" and "503" in error["e"]
    assert error["pid"] == os.getpid() and error["h"] == socket.gethostname()
    [block] = stats["hub"]
    assert block["seconds"] == 0.4 and block["pid"] == os.getpid() and block["t"] == 1.0e9
    row = entries(client, source="broken")["entries"][0]
    assert row["state"] == "gone" and row["last_refresh"] == "error" and "503" in row[
        "last_error"]
    assert sum(stats["history"]["series"]["refresh_failed"]) >= 1
