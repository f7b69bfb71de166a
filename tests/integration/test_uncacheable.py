"""Nobody queues behind an uncacheable answer, through every front door.

Eight concurrent requests to a view that ends in ``abort(404)``, raises, or sets a
cookie: the first is the holder (nobody can know its answer is uncacheable before it
ends), and once it ends the seven others are released together and are all inside the
view at once, as with plain Flask; for a while after (hit-for-miss) the next eight are
not coalesced at all. The test waits (bounded) until they are all in before it lets any
of them finish: queueing them one behind another, as before, would let one in at a time,
and the wait would fail. A cookie never reaches anyone but the request that set it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest
from flask import Flask, abort, make_response, request
from flask_caching import Cache

from service import SWR
from service import Cache as DropInCache
from tests.conftest import settings_for, stop_app

pytestmark = pytest.mark.memcached
N = 8


class Room:
    """Counts the requests inside the view; ``all_in`` once ``expect`` are in at once.
    Everybody waits at the door until the test opens it."""

    def __init__(self) -> None:
        self.inside = 0
        self.expect = 1
        self.all_in = gevent.event.Event()
        self.door = gevent.event.Event()

    def reset(self, expect: int) -> None:
        self.expect = expect
        self.all_in.clear()
        self.door.clear()

    def enter(self) -> None:
        self.inside += 1
        try:
            if self.inside >= self.expect:
                self.all_in.set()
            self.door.wait(10)
        finally:
            self.inside -= 1


def build(kind: str, memcached: Any, key_prefix: str, room: Room) -> Flask:
    app = Flask(f"uncacheable-{kind}")
    app.config.update(CACHE_TYPE="service.backend.MemcachedCache",
                      CACHE_MEMCACHED_SERVERS=[memcached.address],
                      CACHE_KEY_PREFIX=key_prefix, SECRET_KEY="s")
    decorate: Callable[..., Any]
    if kind == "swr":
        swr = SWR()
        decorate = swr.cached
    elif kind == "dropin":
        dropin = DropInCache()
        decorate = dropin.cached
    else:
        plain = Cache()
        decorate = plain.cached

    @app.get("/missing")
    @decorate(timeout=60)
    def missing() -> str:
        room.enter()
        abort(404)

    @app.get("/raises")
    @decorate(timeout=60)
    def raises() -> str:
        room.enter()
        raise RuntimeError("boom")

    @app.get("/cookie")
    @decorate(timeout=60)
    def cookie() -> Any:
        room.enter()
        response = make_response("hello")
        response.set_cookie("who", request.headers.get("X-Me", "?"))
        return response

    if kind == "swr":
        swr.init_app(app, settings_for([memcached.address]))
    elif kind == "dropin":
        dropin.init_app(app)
    else:
        plain.init_app(app)
    return app


@pytest.fixture(params=["swr", "dropin", "flask-caching"])
def front(request: pytest.FixtureRequest, memcached: Any, key_prefix: str
          ) -> Iterator[tuple[Flask, Room]]:
    room = Room()
    app = build(request.param, memcached, key_prefix, room)
    yield app, room
    room.door.set()
    stop_app(app)


@pytest.mark.parametrize("path", ["/missing", "/raises", "/cookie"])
def test_concurrent_requests_run_the_view_at_once(front: tuple[Flask, Room],
                                                  path: str) -> None:
    app, room = front
    app.testing = False                                     # a 500 is an answer here
    expected = {"/missing": 404, "/raises": 500}.get(path, 200)

    def burst(first: int, together: list[int]) -> list[Any]:
        # One URL, one cache key; each request names itself in a header (not part of it).
        clients = [gevent.spawn(lambda i=i: app.test_client().get(
            path, headers={"X-Me": str(i)})) for i in range(first, first + N)]
        for expect in together:
            room.reset(expect)
            try:
                assert room.all_in.wait(10), f"{room.inside} of {expect} ran the view at once"
            finally:
                room.door.set()
        return [c.get(timeout=10) for c in clients]

    # The holder alone, then the seven it held back, all at once.
    answers = burst(0, [1, N - 1])
    # Hit-for-miss: the next eight are not coalesced at all.
    answers += burst(N, [N])
    assert {a.status_code for a in answers} == {expected}
    for answer in answers:
        if "X-Cache" in answer.headers:  # our decorators (plain Flask-Caching sets none)
            assert answer.headers["X-Cache"] == "PASS"
            assert answer.headers["Cache-Status"] == "swr-cache; fwd=uri-miss; " \
                                                     "detail=uncacheable"
    if path == "/cookie":
        for i, answer in enumerate(answers):
            assert answer.headers.getlist("Set-Cookie") == [f"who={i}; Path=/"]
