"""The admin page's session and its CSRF token: the token rotates with the session, and a
cookie a client forged (a 5,000-digit expiry) is a 401, never a 500."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.admin import routes
from service.admin.routes import COOKIE, SESSION_SECONDS, csrf_token
from tests.conftest import settings_for

pytestmark = pytest.mark.memcached
TOKEN = "session-admin-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
BASIC = {"Authorization": "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()}
URL = "/admin/api/sources/items?id=1"


@pytest.fixture
def admin_app(memcached: Any, origin_server: Any, make_app: Any,
              monkeypatch: pytest.MonkeyPatch) -> Flask:
    monkeypatch.setenv("SERVICE_ADMIN_TOKEN", TOKEN)
    app: Flask = make_app(settings_for([memcached.address], sources={
        "items": {"kind": "http", "url": origin_server.url + "/items?id={id}",
                  "max_age": 60},
    }))
    return app


def login(client: FlaskClient) -> str:
    """Load the page as a browser does (Basic login); the CSRF token it embeds."""
    page = client.get("/admin/", headers=BASIC)
    assert page.status_code == 200
    found = re.search(rb'<meta name="csrf-token" content="([^"]+)">', page.data)
    assert found is not None
    return found.group(1).decode()


def delete(client: FlaskClient, csrf: str) -> int:
    return client.delete(URL, headers={"X-CSRF-Token": csrf}).status_code


def test_the_csrf_token_rotates_with_the_session(admin_app: Flask,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = admin_app.test_client(), admin_app.test_client()
    old = login(first)
    new = login(second)                          # another session: another token
    assert old != new
    assert delete(second, old) == 403            # a token of another session is refused
    assert delete(second, new) == 200
    assert delete(first, old) == 200             # each session keeps its own token
    assert login(first) == old                   # a reload within the session keeps it

    # Once the session has expired, its token is worth nothing, with or without the
    # expired cookie; the next page load starts a session with a new token.
    later = routes._now() + SESSION_SECONDS + 1
    monkeypatch.setattr(routes, "_now", lambda: later)
    assert delete(first, old) == 401
    assert first.delete(URL, headers={**BEARER, "X-CSRF-Token": old}).status_code == 200
    assert first.delete(URL, headers={**BASIC, "X-CSRF-Token": old}).status_code == 403
    rotated = login(first)
    assert rotated not in (old, new)
    assert delete(first, old) == 403
    assert delete(first, rotated) == 200
    session = first.get_cookie(COOKIE, path="/admin/")
    assert session is not None and rotated == csrf_token(TOKEN, session.value)


@pytest.mark.parametrize("expiry", ["9" * 5000, "9" * 5000 + ".x.y", "\u00b2", "1" * 13,
                                    "-1", ""])
def test_a_session_cookie_with_a_hostile_expiry_is_a_401(admin_app: Flask,
                                                         expiry: str) -> None:
    client = admin_app.test_client()
    cookie = {"Cookie": f"{COOKIE}={expiry}.nonce.mac"}
    for method, path in (("GET", "/admin/"), ("GET", "/admin/api/stats"), ("DELETE", URL)):
        answer = client.open(path, method=method, headers=cookie)
        assert answer.status_code == 401, (method, path, answer.data[:200])
    # Authenticated by the token, the same cookie is no session: 403 for a mutation.
    answer = client.delete(URL, headers={**cookie, **BASIC, "X-CSRF-Token": "x"})
    assert answer.status_code == 403
