"""The README's example runs as written, against a real memcached."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import stop_app

pytestmark = pytest.mark.memcached


def test_quickstart_app_serves_swr_periodic_and_plain_caching(
    memcached: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key_prefix: str
) -> None:
    # As a user would run it: no settings file at all, the servers from Flask's config.
    monkeypatch.delenv("SERVICE_SETTINGS", raising=False)
    monkeypatch.setenv("FLASK_CACHE_MEMCACHED_SERVERS", f'["{memcached.address}"]')
    monkeypatch.setenv("FLASK_CACHE_KEY_PREFIX", f'"{key_prefix}"')
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("examples.quickstart", None)
    module = importlib.import_module("examples.quickstart")
    client = module.app.test_client()
    try:
        first = client.get("/report?region=us")
        second = client.get("/report?region=us")
        assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
        assert first.get_json() == second.get_json()
        assert first.get_json()["region"] == "us"
        assert client.get("/rates").get_json() == client.get("/rates").get_json()
        assert client.get("/legacy").data == client.get("/legacy").data
        assert client.get("/users/1").get_json() == {"name": "user-1"}
        assert client.get("/users/2").get_json() == {"name": "user-2"}
    finally:
        stop_app(module.app)
        sys.modules.pop("examples.quickstart", None)
