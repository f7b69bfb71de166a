"""A slow miss holds no pooled memcached connection while it waits for its origin (issue 9).

With ``pool_size = 2`` and ten misses of different keys blocked in their origin, hits of
another key still answer, at once: every memcached call borrows a connection for that one
call (``clients.borrow``), never across an origin wait. Nothing here is timed: the hits
must complete while the ten misses are provably still blocked (their gate is shut), and
``pool_timeout`` is long, so a hit that had to wait for a connection would hang, not
quietly count as a miss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import pytest
from flask import Flask

from service.app import swr
from service.flask.state import state_of
from service.memcache.clients import close_pools
from tests.conftest import settings_for

pytestmark = pytest.mark.memcached

SLOW_MISSES = 10


class GatedOrigin:
    """An origin that blocks every call until ``gate`` opens, counting who entered."""

    def __init__(self) -> None:
        self.gate = gevent.event.Event()
        self.entered = 0
        self.all_entered = gevent.event.Event()

    def __call__(self, key: str) -> dict[str, str]:
        self.entered += 1
        if self.entered >= SLOW_MISSES:
            self.all_entered.set()
        self.gate.wait()
        return {"key": key}


@pytest.fixture
def gated(memcached: Any, make_app: Callable[..., Flask]) -> tuple[Flask, GatedOrigin]:
    close_pools()
    # l1_max_entries = 0: every hit reads memcached, so it needs a pooled connection.
    app = make_app(settings_for([memcached.address], cache={
        "pool_size": 2, "pool_timeout": 60.0, "l1_max_entries": 0}))
    origin = GatedOrigin()

    @app.get("/slow/<key>")
    @swr.cached(max_age=60)
    def slow(key: str) -> dict[str, str]:
        return origin(key)

    @app.get("/hot")
    @swr.cached(max_age=60)
    def hot() -> dict[str, str]:
        return {"key": "hot"}

    return app, origin


def test_ten_slow_misses_on_a_pool_of_two_do_not_delay_hits(
        gated: tuple[Flask, GatedOrigin]) -> None:
    app, origin = gated
    client = app.test_client()
    assert client.get("/hot").headers["X-Cache"] == "MISS"   # fill the hot key

    misses = [gevent.spawn(client.get, f"/slow/{i}") for i in range(SLOW_MISSES)]
    try:
        assert origin.all_entered.wait(timeout=30), f"only {origin.entered} misses started"
        pool = state_of(app).pool
        assert pool.in_use == 0, "a miss waiting for its origin holds a pooled connection"

        hits = [gevent.spawn(client.get, "/hot") for _ in range(20)]
        gevent.joinall(hits, timeout=30)
        # The ten misses are still blocked in their origin: the hits did not wait for them.
        assert not origin.gate.is_set() and not any(m.ready() for m in misses)
        assert all(h.successful() for h in hits), "a hit waited for a connection"
        answers = [h.value for h in hits]
        assert {(r.status_code, r.headers["X-Cache"]) for r in answers} == {(200, "HIT")}
    finally:
        origin.gate.set()
        gevent.joinall(misses, timeout=30)
    assert [m.value.headers["X-Cache"] for m in misses] == ["MISS"] * SLOW_MISSES
