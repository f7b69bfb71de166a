"""``@swr.cached`` and ``@swr.memoize`` behave like Flask-Caching's decorators, plus SWR.

One test per bug a new user found (issue 8), against a real memcached, with a fake clock
for the windows and the refresher's own join for background work.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import functools
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
from flask import Flask, abort, g, jsonify, make_response, request, session
from markupsafe import Markup

from service import SWR
from service.flask.state import state_of
from tests.conftest import FakeClock, settings_for, stop_app

pytestmark = pytest.mark.memcached


class Counter:
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        self.calls[name] = self.calls.get(name, 0) + 1
        return self.calls[name]


@pytest.fixture
def made(memcached: Any, clock: FakeClock) -> Iterator[tuple[Flask, SWR, Counter]]:
    app = Flask("decorated")
    app.testing = True
    app.secret_key = "test"
    swr = SWR()
    count = Counter()

    @swr.memoize(max_age=60)
    def user_name(user_id: int) -> str:
        count("user_name")
        return f"user-{user_id}"

    @swr.cached(max_age=60)
    def helper(user_id: int) -> str:
        count("helper")
        return f"helper-{user_id}"

    @app.get("/names")
    @swr.cached(max_age=60)
    def names() -> Any:
        return jsonify([user_name(1), user_name(2), helper(1), helper(2)])

    @app.get("/echo")
    @swr.cached(max_age=60, stale_while_revalidate=600)
    def echo() -> Any:
        return jsonify(n=count("echo"), args=request.args.to_dict(flat=False))

    @app.get("/status/<int:code>")
    @swr.cached(max_age=60)
    def status(code: int) -> Any:
        return f"status {code} #{count(f'status{code}')}", code

    @app.get("/abort")
    @swr.cached(max_age=60)
    def aborts() -> Any:
        count("abort")
        abort(404)

    @app.get("/raise")
    @swr.cached(max_age=60)
    def raises() -> Any:
        count("raise")
        raise ValueError("the view's own error")

    @app.get("/whoami")
    @swr.cached(max_age=60, stale_while_revalidate=600)
    def whoami() -> Any:
        g.seen_by_view = True
        return jsonify(user=request.headers.get("X-User"), cookie=request.cookies.get("c"),
                       session=session.get("s"), n=count("whoami"))

    @app.get("/session")
    def set_session() -> Any:
        session["s"] = "in-session"
        return "ok"

    @app.get("/cookie")
    @swr.cached(max_age=60)
    def cookie() -> Any:
        response = make_response(f"#{count('cookie')}")
        response.set_cookie("c", "secret")
        return response

    @app.get("/lang")
    @swr.cached(max_age=60, stale_while_revalidate=600, vary=["Accept-Language"])
    def lang() -> Any:
        return f"{request.headers.get('Accept-Language')} #{count('lang')}"

    @app.get("/flaky")
    @swr.cached(max_age=60, stale_while_revalidate=600)
    def flaky() -> Any:
        if count("flaky") > 1:
            raise RuntimeError("refresh failed")
        return "first"

    swr.init_app(app, settings_for([memcached.address], refresh={"xfetch_beta": 0.0}),
                 clock=clock, monotonic=clock)
    yield app, swr, count
    stop_app(app)


def test_a_helper_is_keyed_by_its_arguments_inside_a_request(made: Any) -> None:
    app, _swr, count = made
    client = app.test_client()
    assert client.get("/names").get_json() == ["user-1", "user-2", "helper-1", "helper-2"]
    assert client.get("/names").headers["X-Cache"] == "HIT"
    assert count.calls == {"user_name": 2, "helper": 2}
    with app.test_request_context("/names"):
        assert app.view_functions["names"]().get_json()[0] == "user-1"


def test_query_strings_are_escaped_and_canonical(made: Any) -> None:
    app, _swr, count = made
    client = app.test_client()
    one = client.get("/echo?a=1%26b%3D2").get_json()
    two = client.get("/echo?a=1&b=2").get_json()
    assert one["args"] == {"a": ["1&b=2"]} and two["args"] == {"a": ["1"], "b": ["2"]}
    assert client.get("/echo?b=2&a=1").headers["X-Cache"] == "HIT"  # same parameters
    assert count.calls["echo"] == 2


@pytest.mark.parametrize("code", [500, 503, 206, 404])
def test_only_cacheable_statuses_are_stored(made: Any, code: int) -> None:
    app, _swr, count = made
    client = app.test_client()
    first, second = client.get(f"/status/{code}"), client.get(f"/status/{code}")
    assert (first.status_code, second.status_code) == (code, code)
    # Not stored, and said so: PASS (computed for this caller alone, not coalesced).
    assert second.headers["X-Cache"] == "PASS" and "Cache-Control" not in second.headers
    assert second.data == f"status {code} #2".encode()
    assert count.calls[f"status{code}"] == 2


def test_abort_and_exceptions_propagate_as_in_plain_flask(made: Any) -> None:
    app, _swr, count = made
    client = app.test_client()
    assert client.get("/abort").status_code == 404
    assert client.get("/abort").status_code == 404
    assert count.calls["abort"] == 2  # never cached, never turned into a 500
    with pytest.raises(ValueError, match="the view's own error"):
        client.get("/raise")          # TESTING propagates it: the very same exception
    app.testing = False
    assert client.get("/raise").status_code == 500
    assert count.calls["raise"] == 2


def test_the_callers_miss_runs_the_view_in_its_real_request(made: Any) -> None:
    app, _swr, _count = made
    client = app.test_client()
    client.get("/session")
    client.set_cookie("c", "cookie-value")
    with client:
        answer = client.get("/whoami", headers={"X-User": "ada"})
        assert g.seen_by_view is True  # the view's g is the request's g
    assert answer.get_json() == {"user": "ada", "cookie": "cookie-value",
                                 "session": "in-session", "n": 1}


def test_a_response_that_sets_a_cookie_is_never_cached(made: Any) -> None:
    app, _swr, count = made
    client = app.test_client()
    assert client.get("/cookie").data == b"#1"
    assert client.get("/cookie").data == b"#2"
    assert count.calls["cookie"] == 2


def test_vary_headers_are_part_of_the_key_and_of_the_rebuilt_request(
        made: Any, clock: FakeClock) -> None:
    app, _swr, count = made
    client = app.test_client()
    assert client.get("/lang", headers={"Accept-Language": "fr"}).data == b"fr #1"
    assert client.get("/lang", headers={"Accept-Language": "de"}).data == b"de #2"
    assert client.get("/lang", headers={"Accept-Language": "fr"}).data == b"fr #1"
    clock.advance(61)
    assert client.get("/lang", headers={"Accept-Language": "fr"}).headers["X-Cache"] == "STALE"
    assert state_of(app).refresher.join(timeout=5)
    # The background refresh rebuilt a request carrying the vary header.
    assert client.get("/lang", headers={"Accept-Language": "fr"}).data == b"fr #3"


def test_a_failed_background_refresh_of_a_view_is_a_failed_refresh(
        made: Any, clock: FakeClock) -> None:
    app, _swr, _count = made
    client = app.test_client()
    assert client.get("/flaky").data == b"first"
    clock.advance(61)
    stale = client.get("/flaky")
    assert (stale.headers["X-Cache"], stale.data) == ("STALE", b"first")
    assert state_of(app).refresher.join(timeout=5)
    key = next(k for k, _ in state_of(app).ledger.items() if "flaky" in k)
    assert state_of(app).refresher.failures(key) == 1
    assert state_of(app).ledger.get(key).last_outcome == "error"  # type: ignore[union-attr]
    assert client.get("/flaky").data == b"first"  # still served within its windows


def test_if_none_match_and_head(made: Any) -> None:
    app, _swr, _count = made
    client = app.test_client()
    first = client.get("/echo?x=1")
    again = client.get("/echo?x=1", headers={"If-None-Match": first.headers["ETag"]})
    assert (again.status_code, again.data) == (304, b"")
    head = client.head("/echo?x=1")
    assert (head.status_code, head.data, head.headers["X-Cache"]) == (200, b"", "HIT")


def test_flask_caching_keys_cannot_read_or_clobber_swr_entries(made: Any) -> None:
    app, swr, count = made
    client = app.test_client()
    client.get("/echo?z=1")
    with app.app_context():
        for key in ("view//echo?z=1", "/echo?z=1", "echo"):
            assert swr.cache.get(key) is None
            swr.cache.set(key, "clobbered")
    hit = client.get("/echo?z=1")
    assert hit.headers["X-Cache"] == "HIT" and hit.get_json()["n"] == 1
    assert count.calls["echo"] == 1


def test_flask_caching_parameters(memcached: Any, clock: FakeClock) -> None:
    app = Flask("params")
    swr = SWR()
    count = Counter()
    bypass = {"on": False}
    force = {"on": False}

    @app.get("/p")
    @swr.cached(timeout=30, query_string=False, unless=lambda: bypass["on"],
                forced_update=lambda: force["on"])
    def by_path() -> str:
        return f"p{count('p')}"

    @app.get("/k")
    @swr.cached(max_age=30, make_cache_key=lambda: "fixed-key",
                response_filter=lambda r: r.status_code in (200, 404))
    def by_key() -> Any:
        return f"k{count('k')}", 404

    @app.get("/prefix")
    @swr.cached(max_age=30, key_prefix="static")
    def prefixed() -> str:
        return f"s{count('s')}"

    @swr.memoize(max_age=30, args_to_ignore=["verbose"])
    def add(a: int, b: int, verbose: bool = False) -> int:
        count("add")
        return a + b

    swr.init_app(app, settings_for([memcached.address]), clock=clock, monotonic=clock)
    try:
        client = app.test_client()
        assert client.get("/p?a=1").data == client.get("/p?a=2").data == b"p1"
        assert client.get("/p").headers["Cache-Control"].startswith("max-age=30,")
        bypass["on"] = True
        assert client.get("/p").data == b"p2"       # unless: the cache is bypassed
        bypass["on"] = False
        force["on"] = True
        assert client.get("/p").data == b"p3"       # forced_update: recomputed and stored
        force["on"] = False
        assert client.get("/p").data == b"p3"
        assert client.get("/k").data == client.get("/k?x=1").data == b"k1"  # filter: 404 ok
        assert client.get("/prefix?a=1").data == b"s1"
        with app.app_context():
            assert add(1, 2) == add(1, 2, verbose=True) == 3
            assert count.calls["add"] == 1
            swr.delete_memoized(add, 1, 2)
            assert add(1, b=2) == 3
            assert count.calls["add"] == 2
        with pytest.raises(TypeError, match="no_such"):
            swr.cached(max_age=1, no_such=True)
    finally:
        stop_app(app)


def test_memoize_works_outside_an_app_context(memcached: Any) -> None:
    app = Flask("cli")
    swr = SWR()
    count = Counter()

    @swr.memoize(max_age=30)
    def slow(x: int) -> dict[str, int]:
        return {"x": x, "n": count("slow")}

    swr.init_app(app, settings_for([memcached.address]))
    try:
        assert slow(1) == slow(1) == {"x": 1, "n": 1}   # no app context at all
        with app.app_context():
            assert slow(1) == {"x": 1, "n": 1}
    finally:
        stop_app(app)


class Color(enum.IntEnum):
    RED = 1


class Point(NamedTuple):
    x: int
    y: int


@dataclasses.dataclass(frozen=True)
class Invoice:
    number: str
    total: decimal.Decimal


def test_values_come_back_as_their_own_types_through_memcached(memcached: Any) -> None:
    value = {
        "when": datetime.datetime(2026, 11, 29, 12, 0, tzinfo=datetime.UTC),
        "day": datetime.date(2026, 11, 29), "amount": decimal.Decimal("10.10"),
        "id": uuid.UUID(int=7), "html": Markup("<b>x</b>"),
        "ordered": collections.OrderedDict(b=1, a=2), "point": Point(1, 2),
        "color": Color.RED, "tags": {"a", "b"}, "pair": (1, 2),
        "invoice": Invoice("A-1", decimal.Decimal("3.50")),
    }
    apps = []
    for name in ("writer", "reader"):   # the reader's in-process tier starts empty
        app = Flask(name)
        swr = SWR()

        @swr.memoize(max_age=60, args_to_ignore=["computing"])
        def load(computing: str = name) -> dict[str, Any]:
            assert computing == "writer", "the reader must get the writer's entry"
            return value

        swr.init_app(app, settings_for([memcached.address]))
        apps.append((app, functools.partial(load)))
    try:
        assert apps[0][1]() == value
        got = apps[1][1]()                  # same function name, same key: from memcached
        assert got == value
        assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in value.items()}
        assert got["when"].tzinfo is datetime.UTC
    finally:
        for app, _load in apps:
            stop_app(app)


def test_without_memcached_the_app_answers_and_says_so_once(
        caplog: pytest.LogCaptureFixture) -> None:
    from tests.servers import free_port

    app = Flask("no-memcached")
    app.config["CACHE_MEMCACHED_SERVERS"] = [f"127.0.0.1:{free_port()}"]  # nothing there
    swr = SWR(app)
    count = Counter()

    @app.get("/")
    @swr.cached(max_age=60)
    def index() -> str:
        return f"#{count('index')}"

    try:
        client = app.test_client()
        answers = [client.get("/") for _ in range(10)]
        assert {a.status_code for a in answers} == {200}
        assert answers[-1].data == b"#1"        # the in-process tier still caches
        said = [r.getMessage() for r in caplog.records if "is unreachable" in r.getMessage()]
        assert len(said) == 1 and "CACHE_MEMCACHED_SERVERS" in said[0]
    finally:
        stop_app(app)
