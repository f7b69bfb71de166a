"""/healthz and /readyz while memcached is up, stopped, frozen and back."""

from __future__ import annotations

from typing import Any

import gevent
import pytest
from flask import Flask

from service.flask.state import state_of
from tests.conftest import settings_for

pytestmark = pytest.mark.memcached


def test_healthz(app: Flask) -> None:
    response = app.test_client().get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


@pytest.mark.private_memcached
def test_readyz_is_degraded_while_memcached_is_stopped_and_ok_when_it_returns(
    memcached: Any, make_app: Any
) -> None:
    app = make_app(settings_for([memcached.address], cache={"circuit_reset": 0.05}))
    client = app.test_client()
    ok = client.get("/readyz")
    assert ok.status_code == 200
    assert ok.get_json()["status"] == "ok"
    assert ok.get_json()["servers"][memcached.address].startswith("1.")

    memcached.stop()
    down = client.get("/readyz")
    assert down.status_code == 200          # memcached is shared: never fail the fleet
    body = down.get_json()
    assert body["status"] == "degraded"
    assert memcached.address in body["reason"]

    memcached.restart()
    # The refused connection opened the circuit at once (nothing listened there); once
    # circuit_reset (0.05 s) has passed, the next call is the probe and reaches the
    # restarted server: no restart of the service needed.
    pool = state_of(app).pool
    breaker = pool.breakers[memcached.address]
    assert breaker.is_open
    with gevent.Timeout(5):
        while breaker.state(pool.monotonic()) == "open":
            gevent.sleep(0.01)
    again = client.get("/readyz")
    assert again.get_json()["status"] == "ok", again.get_json()


@pytest.mark.private_memcached
def test_readyz_is_degraded_when_memcached_is_frozen(memcached: Any, make_app: Any) -> None:
    app = make_app(settings_for([memcached.address], cache={"timeout": 0.2}))
    memcached.freeze()
    try:
        body = app.test_client().get("/readyz").get_json()
    finally:
        memcached.thaw()
    assert body["status"] == "degraded"
    assert "timed out" in body["reason"] or "timeout" in body["reason"]


def test_readyz_names_the_dead_server_among_several(memcached_factory: Any,
                                                    make_app: Any) -> None:
    a, b = memcached_factory(), memcached_factory()
    app = make_app(settings_for([a.address, b.address]))
    b.stop()
    body = app.test_client().get("/readyz").get_json()
    assert body["status"] == "degraded"
    assert body["servers"][a.address] is not None
    assert body["servers"][b.address] is None
    assert b.address in body["reason"] and a.address not in body["reason"].split(":")[0]
