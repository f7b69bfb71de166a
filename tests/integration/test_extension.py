"""The library API: @swr.cached on views and functions, @swr.periodic, cache headers."""

from __future__ import annotations

from typing import Any

import gevent.event
import pytest
from flask import Flask, jsonify, request

from service import SWR
from service.flask.state import state_of
from tests.conftest import FakeClock, settings_for, stop_app

pytestmark = pytest.mark.memcached


@pytest.fixture
def user_app(memcached: Any, clock: FakeClock) -> Any:
    """A user's own Flask app adopting the extension, as the README shows."""
    app = Flask("user_app")
    swr = SWR()
    calls = {"report": 0, "square": 0, "rates": 0}

    @app.get("/report")
    @swr.cached(max_age=60, stale_while_revalidate=600, stale_if_error=3600)
    def report() -> Any:
        calls["report"] += 1
        return jsonify(n=calls["report"], region=request.args.get("region"))

    @swr.cached(max_age=60)
    def square(x: int) -> int:
        calls["square"] += 1
        return x * x

    @swr.periodic("rates", every=3600)
    def rates() -> dict[str, float]:
        calls["rates"] += 1
        return {"EUR": 1.0 + calls["rates"]}

    @app.get("/rates")
    def rates_view() -> Any:
        return swr.value("rates")

    swr.init_app(app, settings_for([memcached.address], refresh={"xfetch_beta": 0.0}),
                 clock=clock, monotonic=clock)
    yield app, swr, calls, square
    stop_app(app)


def test_view_is_cached_per_query_with_cache_headers(user_app: Any, clock: FakeClock) -> None:
    app, _swr, calls, _ = user_app
    client = app.test_client()
    first = client.get("/report?region=eu")
    assert first.status_code == 200
    assert first.headers["X-Cache"] == "MISS"
    assert first.headers["Cache-Control"] == (
        "max-age=60, stale-while-revalidate=600, stale-if-error=3600")
    assert first.headers["Age"] == "0"
    # For nginx, which ignores Age: the whole seconds of freshness surely left.
    assert first.headers["X-Accel-Expires"] == "59"
    etag = first.headers["ETag"]
    clock.advance(10)
    second = client.get("/report?region=eu")
    assert second.headers["X-Cache"] == "HIT"
    assert second.get_json() == first.get_json() == {"n": 1, "region": "eu"}
    assert second.headers["Age"] == "10"
    assert second.headers["Cache-Control"].startswith("max-age=60,")  # RFC 9111: with Age
    assert second.headers["X-Accel-Expires"] == "49"
    names = [name for name, _ in second.headers]     # nginx reads the windows first
    assert names.index("Cache-Control") < names.index("X-Accel-Expires")
    assert client.get("/report?region=us").get_json() == {"n": 2, "region": "us"}
    not_modified = client.get("/report?region=eu", headers={"If-None-Match": etag})
    assert not_modified.status_code == 304 and not_modified.data == b""
    assert calls["report"] == 2


def test_stale_view_refresh_reruns_the_view_for_the_same_url(user_app: Any,
                                                             clock: FakeClock) -> None:
    app, _swr, calls, _ = user_app
    client = app.test_client()
    client.get("/report?region=eu")
    clock.advance(61)
    stale = client.get("/report?region=eu")
    assert stale.headers["X-Cache"] == "STALE"
    assert stale.headers["Cache-Control"].startswith("max-age=60, stale-while-revalidate=600")
    assert stale.headers["Age"] == "61"
    assert stale.headers["X-Accel-Expires"] == "0"                  # nginx: do not store
    assert state_of(app).refresher.join(timeout=5)
    fresh = client.get("/report?region=eu")
    assert fresh.headers["X-Cache"] == "HIT"
    assert fresh.get_json() == {"n": 2, "region": "eu"}   # re-run with the request's args
    assert calls["report"] == 2


def test_plain_functions_are_cached_by_arguments(user_app: Any) -> None:
    app, _swr, calls, square = user_app
    with app.app_context():
        assert [square(3), square(3), square(4), square(x=3)] == [9, 9, 16, 9]
    assert calls["square"] == 2     # square(x=3) is square(3): keyed by the bound arguments


def test_periodic_value_is_computed_once_and_read_without_waiting(user_app: Any) -> None:
    app, _swr, calls, _ = user_app
    client = app.test_client()
    assert client.get("/rates").get_json() == {"EUR": 2.0}
    assert client.get("/rates").get_json() == {"EUR": 2.0}
    assert calls["rates"] == 1


def test_periodic_loop_recomputes_in_one_worker_of_two(memcached: Any) -> None:
    """Two apps on one memcached stand for two workers; the claim picks one of them.

    Both workers' loops wake when the value is due, at the same moment. Each computation
    takes a while (it yields), so two workers both computing one window would overlap:
    the test records the most computations ever running at once, which the claim keeps
    at one. With the claim always granted both would run, and this would be two.
    """
    computed: list[str] = []
    running = {"now": 0, "most": 0}
    done = gevent.event.Event()
    apps = []
    for name in ("w1", "w2"):
        app = Flask(name)
        swr = SWR()

        @swr.periodic("tick", every=0.2)
        def tick(worker: str = name) -> int:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
            try:
                gevent.sleep(0.05)                   # a computation that takes a while
                computed.append(worker)
                if len(computed) >= 4:
                    done.set()
                return len(computed)
            finally:
                running["now"] -= 1

        swr.init_app(app, settings_for([memcached.address]))
        apps.append(app)
    try:
        for app in apps:
            state_of(app).refresher.start()
        assert done.wait(timeout=10)
    finally:
        for app in apps:
            state_of(app).refresher.stop(timeout=1)
            stop_app(app)
    assert running["most"] == 1, f"{running['most']} workers computed one window at once"
