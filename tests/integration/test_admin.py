"""The admin API and page: authentication, CSRF, stats, entries, invalidate, refresh."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.admin import csrf_token
from service.state import state_of
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
    }))
    return app


def test_admin_is_404_without_a_configured_token(memcached: Any, make_app: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVICE_ADMIN_TOKEN", raising=False)
    client = make_app(settings_for([memcached.address])).test_client()
    for path in ("/admin/", "/admin/api/stats", "/admin/api/entries"):
        assert client.get(path, headers=BEARER).status_code == 404


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, basic("wrong"),
                                     {"Authorization": f"Bearer {TOKEN}x"}])
def test_wrong_or_missing_credentials_are_401(admin_app: Flask,
                                              headers: dict[str, str]) -> None:
    response = admin_app.test_client().get("/admin/api/stats", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")


def read(client: FlaskClient, **params: str) -> Any:
    return client.get("/v1/items", query_string=params)


def test_stats_and_entries_show_what_was_served(admin_app: Flask) -> None:
    client = admin_app.test_client()
    read(client, id="1")
    read(client, id="1")
    read(client, id="2")
    stats = client.get("/admin/api/stats", headers=BEARER).get_json()
    assert stats["sources"]["items"]["miss"] >= 2 and stats["sources"]["items"]["hit"] >= 1
    assert stats["sources"]["items"]["refresh_ok"] >= 2
    entries = client.get("/admin/api/entries", headers=BEARER).get_json()
    mine = {tuple(sorted(e["params"].items())): e for e in entries if e["source"] == "items"}
    first = mine[(("id", "1"),)]
    assert first["state"] == "fresh" and first["in_memcached"] is True
    assert first["last_refresh"] == "ok" and first["lease_holder"] is None
    assert first["fresh_until"] < first["stale_until"] <= first["error_until"]


def test_invalidate_one_entry_then_a_whole_source(admin_app: Flask, origin_server: Any) -> None:
    client = admin_app.test_client()
    read(client, id="1")
    read(client, id="2")
    assert origin_server.count("/items") == 2
    gone = client.delete("/admin/api/sources/items?id=1", headers=BEARER)
    assert gone.get_json()["invalidated"] == "entry"
    assert read(client, id="1").headers["X-Cache"] == "MISS"
    assert read(client, id="2").headers["X-Cache"] == "HIT"
    assert client.delete("/admin/api/sources/items", headers=BEARER).status_code == 200
    assert read(client, id="2").headers["X-Cache"] == "MISS"      # new generation
    assert origin_server.count("/items") == 4
    assert client.delete("/admin/api/sources/nope", headers=BEARER).status_code == 404
    assert client.delete("/admin/api/sources/items?bogus=1",
                         headers=BEARER).status_code == 400


def test_refresh_runs_in_the_background(admin_app: Flask, origin_server: Any) -> None:
    client = admin_app.test_client()
    read(client, id="7")
    response = client.post("/admin/api/sources/items/refresh?id=7", headers=BEARER)
    assert response.status_code == 202 and response.get_json()["scheduled"] is True
    assert state_of(admin_app).refresher.join(timeout=10)
    assert origin_server.count("/items") == 2
    assert read(client, id="7").headers["X-Cache"] == "HIT"


def test_browser_requests_need_the_csrf_token_and_the_same_origin(admin_app: Flask) -> None:
    client = admin_app.test_client()
    read(client, id="1")
    page = client.get("/admin/", headers=basic(TOKEN))
    assert page.status_code == 200 and b"items" in page.data
    assert csrf_token(TOKEN).encode() in page.data
    assert page.headers["X-Frame-Options"] == "DENY"
    url = "/admin/api/sources/items?id=1"
    assert client.delete(url, headers=basic(TOKEN)).status_code == 403
    assert client.delete(url, headers={**basic(TOKEN), "X-CSRF-Token": "nope"}).status_code == 403
    ok = client.delete(url, headers={**basic(TOKEN), "X-CSRF-Token": csrf_token(TOKEN)})
    assert ok.status_code == 200
    evil = client.get("/admin/api/stats", headers={**BEARER, "Origin": "https://evil.example"})
    assert evil.status_code == 403


def test_admin_actions_are_logged_as_events(admin_app: Flask,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="service")
    admin_app.test_client().delete("/admin/api/sources/items?id=3", headers=BEARER)
    actions = [r for r in caplog.records if getattr(r, "event", None) == "admin"]
    assert [a.action for a in actions] == ["invalidate"]
    assert actions[0].source == "items" and len(actions[0].key) == 16
