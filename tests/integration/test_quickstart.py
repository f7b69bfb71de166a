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
    settings = tmp_path / "settings.toml"
    settings.write_text(
        f'[cache]\nservers = ["{memcached.address}"]\nkey_prefix = "{key_prefix}"\n')
    monkeypatch.setenv("SERVICE_SETTINGS", str(settings))
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
    finally:
        stop_app(module.app)
        sys.modules.pop("examples.quickstart", None)
