"""``/healthz``, ``/readyz`` and ``/metrics`` in a library app: mounted when it asks
(``SWR(app, endpoints=True)`` or ``SWR_ENDPOINTS``), never otherwise."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from service import SWR
from tests.conftest import settings_for, stop_app

pytestmark = pytest.mark.memcached


def library_app(memcached: Any, config: dict[str, Any], **kwargs: Any) -> Flask:
    app = Flask("endpoints_app")
    app.config.update(config)
    SWR(app, settings_for([memcached.address]), **kwargs)
    return app


@pytest.mark.parametrize("config, kwargs", [
    ({}, {"endpoints": True}),
    ({"SWR_ENDPOINTS": True}, {}),
    ({"SWR_ENDPOINTS": "true"}, {}),            # as an environment-loaded config gives it
])
def test_asked_for_they_answer(memcached: Any, config: dict[str, Any],
                               kwargs: dict[str, Any]) -> None:
    app = library_app(memcached, config, **kwargs)
    try:
        client = app.test_client()
        assert client.get("/healthz").get_json() == {"status": "ok"}
        ready = client.get("/readyz").get_json()
        assert ready["status"] == "ok" and memcached.address in ready["servers"]
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and b"cache_requests_total" in metrics.data
    finally:
        stop_app(app)


@pytest.mark.parametrize("config, kwargs", [
    ({}, {}), ({"SWR_ENDPOINTS": "0"}, {}), ({"SWR_ENDPOINTS": True}, {"endpoints": False}),
])
def test_not_asked_for_the_paths_stay_the_apps(memcached: Any, config: dict[str, Any],
                                               kwargs: dict[str, Any]) -> None:
    app = library_app(memcached, config, **kwargs)
    try:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert app.test_client().get(path).status_code == 404
    finally:
        stop_app(app)


def test_the_service_and_an_app_that_mounted_them_itself_keep_one_each(
        memcached: Any, make_app: Any) -> None:
    from service.flask import health

    app = make_app(settings_for([memcached.address]))  # create_app mounts them
    health.init_app(app)                               # a second time: nothing changes
    assert app.test_client().get("/healthz").status_code == 200
