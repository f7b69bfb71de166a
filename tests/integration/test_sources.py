"""``GET /v1/...`` end to end: every source kind, every cache header, every error status.

Against a real memcached and a real origin HTTP server in another process that counts the
requests it serves (tests/origin.py), through the app's own routes (Flask's test client).
Window transitions use a fake clock; background refreshes are awaited through the
refresher's own join, and child processes through bounded polls.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.flask.state import AppState, state_of
from tests.conftest import FakeClock, settings_for
from tests.servers import free_port, process_state

pytestmark = pytest.mark.memcached

FIX = "tests.sources_fixtures"
WINDOWS = {"max_age": 60, "stale_while_revalidate": 600, "stale_if_error": 3600}
FULL_CC = "max-age=60, stale-while-revalidate=600, stale-if-error=3600"

Build = Callable[..., Flask]


def http_source(url: str, **overrides: Any) -> dict[str, Any]:
    return {"kind": "http", "url": url, **WINDOWS, **overrides}


def python_source(func: str, executor: str = "thread", **overrides: Any) -> dict[str, Any]:
    return {"kind": "python", "target": f"{FIX}:{func}", "executor": executor,
            **WINDOWS, **overrides}


def composite_source(*parts: str, **overrides: Any) -> dict[str, Any]:
    return {"kind": "composite", "parts": list(parts), **WINDOWS, **overrides}


@pytest.fixture
def build(memcached: Any, make_app: Callable[..., Flask]) -> Build:
    """``build(sources, **refresh)``: an app with these sources on the test memcached.

    make_app stops it afterwards (drains its refresher, stops its process pool, closes its
    memcached pool).
    """

    def make(sources: dict[str, dict[str, Any]], clock: FakeClock | None = None,
             **refresh: Any) -> Flask:
        refresh = {"xfetch_beta": 0.0, "fetch_timeout": 5.0, **refresh}
        return make_app(settings_for([memcached.address], sources=sources, refresh=refresh),
                        clock=clock)

    return make


def swr(app: Flask) -> AppState:
    return state_of(app)


def get(client: FlaskClient, name: str, **params: str) -> Any:
    return client.get(f"/v1/{name}", query_string=params)


def assert_error(response: Any, status: int, *mentions: str) -> dict[str, Any]:
    assert response.status_code == status, response.data
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) >= {"error", "detail"}
    assert isinstance(body["error"], str) and body["error"]
    for text in mentions:
        assert text in body["detail"], body
    return dict(body)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


# -- http sources ---------------------------------------------------------------------------


def test_http_miss_then_hit_asks_the_origin_once(build: Build, origin_server: Any) -> None:
    app = build({"items": http_source(origin_server.url + "/items?id={id}")})
    client = app.test_client()
    first = get(client, "items", id="42")
    assert first.status_code == 200
    assert first.headers["X-Cache"] == "MISS"
    assert first.mimetype == "application/json"
    assert first.get_json() == {"path": "/items", "params": {"id": "42"}, "n": 1}
    second = get(client, "items", id="42")
    assert second.headers["X-Cache"] == "HIT"
    assert second.data == first.data
    assert origin_server.count("/items") == 1
    other = get(client, "items", id="43")                 # another key, another fetch
    assert (other.headers["X-Cache"], other.get_json()["n"]) == ("MISS", 2)
    assert origin_server.count("/items") == 2


@pytest.mark.parametrize("status", [200, 201, 404, 410, 451])
def test_http_status_content_type_and_body_are_passed_through_and_cached(
    build: Build, origin_server: Any, status: int
) -> None:
    # The one cacheable rule of every front door: a 2xx other than 206 is cached; any
    # other answer below 500 is passed through to its caller and not stored.
    url = origin_server.url + f"/page?status={status}&ctype=text/html&body={{text}}"
    app = build({"page": http_source(url)})
    client = app.test_client()
    cached = 200 <= status < 300
    for expected_cache in (("MISS", "HIT") if cached else ("PASS", "PASS")):
        response = get(client, "page", text="<p>hello</p>")
        assert response.status_code == status
        assert response.headers["Content-Type"] == "text/html"
        assert response.data == b"<p>hello</p>"
        assert response.headers["X-Cache"] == expected_cache
    assert origin_server.count("/page") == (1 if cached else 2)


def test_http_placeholders_are_url_encoded(build: Build, origin_server: Any) -> None:
    app = build({
        "items": http_source(origin_server.url + "/items?id={id}"),
        "things": http_source(origin_server.url + "/things/{id}"),
    })
    client = app.test_client()
    hostile = "a/b&c=d?e f#g%h+i;j ü€😀 ../x"
    response = get(client, "items", id=hostile)
    assert response.status_code == 200
    assert response.get_json()["params"] == {"id": hostile}       # one parameter, intact
    in_path = get(client, "things", id="../../etc/passwd")
    assert in_path.status_code == 200
    # The value stays one path segment: its '/' is encoded, nothing is traversed.
    assert in_path.get_json()["path"] == "/things/" + urllib.parse.quote(
        "../../etc/passwd", safe="")


def test_origin_5xx_without_a_stale_copy_is_a_502(build: Build, origin_server: Any) -> None:
    app = build({"broken": http_source(origin_server.url + "/broken?status=500")})
    client = app.test_client()
    assert_error(get(client, "broken"), 502, "500")
    assert origin_server.count("/broken") == 1
    # A failed cold fetch is remembered for error_ttl: the origin is not hammered.
    assert_error(get(client, "broken"), 502)
    assert origin_server.count("/broken") == 1


def test_origin_slower_than_fetch_timeout_is_a_504(build: Build, origin_server: Any) -> None:
    app = build({"slow": http_source(origin_server.url + "/slow?delay=5")}, fetch_timeout=0.5)
    started = time.monotonic()
    assert_error(get(app.test_client(), "slow"), 504)
    assert time.monotonic() - started < 4          # did not wait for the origin's answer


def test_refused_connection_is_a_502(build: Build) -> None:
    app = build({"gone": http_source(f"http://127.0.0.1:{free_port()}/nothing")})
    assert_error(get(app.test_client(), "gone"), 502, "gone")


# -- python sources -------------------------------------------------------------------------

EXECUTORS = ["thread", "process"]


def python_sources(executor: str) -> dict[str, dict[str, Any]]:
    names = ["echo", "double", "fails", "not_json", "pid", "niceness", "burn", "slow"]
    return {name: python_source(name, executor) for name in names}


@pytest.mark.parametrize("executor", EXECUTORS)
def test_python_value_is_answered_as_json_and_cached(build: Build, executor: str) -> None:
    client = build(python_sources(executor)).test_client()
    first = get(client, "echo", a="1", b="ü")
    assert first.status_code == 200
    assert first.mimetype == "application/json"
    assert first.get_json() == {"a": "1", "b": "ü"}
    assert first.headers["X-Cache"] == "MISS"
    assert get(client, "echo", a="1", b="ü").headers["X-Cache"] == "HIT"
    assert get(client, "double", x="21").get_json() == 42


@pytest.mark.parametrize("executor", EXECUTORS)
def test_python_parameters_are_checked(build: Build, executor: str) -> None:
    client = build(python_sources(executor)).test_client()
    missing = assert_error(get(client, "double"), 400, "missing", "x")
    assert missing["missing"] == ["x"]
    unknown = assert_error(get(client, "double", x="1", y="2"), 400, "unknown", "y")
    assert unknown["unknown"] == ["y"]
    assert "x" not in unknown["detail"].partition("unknown")[2]


@pytest.mark.parametrize("executor", EXECUTORS)
def test_python_function_raising_is_a_502(build: Build, executor: str) -> None:
    client = build(python_sources(executor)).test_client()
    assert_error(get(client, "fails"), 502, "RuntimeError", "fixture failure")


@pytest.mark.parametrize("kind", ["set", "object"])
@pytest.mark.parametrize("executor", EXECUTORS)
def test_python_result_that_is_not_json_is_a_502(build: Build, executor: str,
                                                 kind: str) -> None:
    client = build(python_sources(executor)).test_client()
    assert_error(get(client, "not_json", kind=kind), 502, "not JSON-encodable")


@pytest.mark.parametrize("executor", EXECUTORS)
def test_python_executor_runs_where_it_says(build: Build, executor: str) -> None:
    client = build(python_sources(executor)).test_client()
    where = get(client, "niceness").get_json()
    if executor == "thread":
        assert where["pid"] == os.getpid()
    else:
        assert where["pid"] != os.getpid()                 # another process...
        assert where["nice"] == min(19, os.nice(0) + 10)   # ...at a lower priority
    assert (get(client, "pid").get_json() == os.getpid()) == (executor == "thread")


def test_process_task_over_fetch_timeout_is_a_504_and_its_child_is_replaced(
    build: Build,
) -> None:
    client = build(python_sources("process"), fetch_timeout=1.0).test_client()
    child = get(client, "pid", tag="before").get_json()
    assert child != os.getpid()
    started = time.monotonic()
    assert_error(get(client, "burn", seconds="30"), 504)
    assert time.monotonic() - started < 10
    wait_until(lambda: process_state(child) in (None, "Z", "X"))   # the runaway was killed
    after = get(client, "pid", tag="after")
    assert after.status_code == 200
    assert after.get_json() not in (child, os.getpid())           # a new child serves
    assert get(client, "burn", seconds="0.01").status_code == 200


def test_process_that_dies_is_a_502_and_its_child_is_replaced(build: Build) -> None:
    sources = {**python_sources("process"), "crash": python_source("crash", "process")}
    client = build(sources).test_client()
    child = get(client, "pid", tag="before").get_json()
    assert_error(get(client, "crash"), 502, "died")
    wait_until(lambda: process_state(child) in (None, "Z", "X"))
    after = get(client, "pid", tag="after")
    assert after.status_code == 200
    assert after.get_json() not in (child, os.getpid())


def test_thread_task_over_fetch_timeout_is_a_504(build: Build) -> None:
    client = build(python_sources("thread"), fetch_timeout=0.5).test_client()
    started = time.monotonic()
    assert_error(get(client, "slow", seconds="3"), 504)
    assert time.monotonic() - started < 2.5
    assert get(client, "echo", a="still serving").status_code == 200


# -- composite sources ----------------------------------------------------------------------


def composite_app(build: Build, origin_server: Any, clock: FakeClock | None = None) -> Flask:
    return build({
        "a": http_source(origin_server.url + "/a?id={id}"),
        "b": http_source(origin_server.url + "/b?body=plain-{id}&ctype=text/plain"),
        "p": python_source("double"),
        "broken": http_source(origin_server.url + "/broken?status=503"),
        "combo": composite_source("a", "b", "p"),
        "combo_broken": composite_source("a", "broken"),
    }, clock=clock)


def test_composite_answers_one_object_keyed_by_part(build: Build, origin_server: Any) -> None:
    client = composite_app(build, origin_server).test_client()
    response = get(client, "combo", id="7", x="4")
    assert response.status_code == 200
    assert response.headers["X-Cache"] == "MISS"
    assert response.get_json() == {
        "a": {"path": "/a", "params": {"id": "7"}, "n": 1},
        "b": "plain-7",
        "p": 8,
    }
    assert get(client, "combo", id="7", x="4").headers["X-Cache"] == "HIT"
    assert origin_server.count("/a") == origin_server.count("/b") == 1


def test_composite_parts_are_cached_under_their_own_entries(build: Build,
                                                            origin_server: Any) -> None:
    client = composite_app(build, origin_server).test_client()
    assert get(client, "combo", id="7", x="4").status_code == 200
    for name, params in (("a", {"id": "7"}), ("b", {"id": "7"}), ("p", {"x": "4"})):
        alone = get(client, name, **params)
        assert (alone.status_code, alone.headers["X-Cache"]) == (200, "HIT"), name
    assert get(client, "p", x="4").get_json() == 8
    assert origin_server.count("/a") == origin_server.count("/b") == 1


def test_composite_parameters_are_the_union_of_its_parts(build: Build,
                                                         origin_server: Any) -> None:
    client = composite_app(build, origin_server).test_client()
    body = assert_error(get(client, "combo", id="7"), 400, "x")
    assert body["missing"] == ["x"]
    assert_error(get(client, "combo", id="7", x="4", z="9"), 400, "z")


def test_composite_cache_headers_and_304(build: Build, origin_server: Any,
                                         clock: FakeClock) -> None:
    app = composite_app(build, origin_server, clock)
    client = app.test_client()
    first = get(client, "combo", id="3", x="1")
    assert (first.headers["X-Cache"], first.headers["Cache-Control"]) == ("MISS", FULL_CC)
    clock.advance(5)
    again = client.get("/v1/combo?id=3&x=1", headers={"If-None-Match": first.headers["ETag"]})
    assert (again.status_code, again.data, again.headers["X-Cache"]) == (304, b"", "HIT")
    assert again.headers["Age"] == "5"
    clock.advance(60)
    stale = get(client, "combo", id="3", x="1")
    assert (stale.status_code, stale.headers["X-Cache"]) == (200, "STALE")
    assert stale.data == first.data
    assert swr(app).refresher.join(timeout=10)
    assert origin_server.count("/a") == origin_server.count("/b") == 2


def test_composite_with_a_failing_part_is_a_502(build: Build, origin_server: Any) -> None:
    client = composite_app(build, origin_server).test_client()
    assert_error(get(client, "combo_broken", id="1"), 502, "503")
    assert get(client, "a", id="1").headers["X-Cache"] == "HIT"   # the good part was kept


# -- large values --------------------------------------------------------------------------


def test_values_over_the_memcached_item_size_are_served_and_cached(
    build: Build, origin_server: Any
) -> None:
    app = build({"blob": http_source(origin_server.url + "/blob?size={size}"),
                 "big": python_source("big")})
    client = app.test_client()
    for name, size in (("blob", 3_000_000), ("big", 2_500_000)):
        for expected in ("MISS", "HIT"):
            response = get(client, name, size=str(size))
            assert (response.status_code, response.headers["X-Cache"]) == (200, expected)
            data = response.get_json() if name == "big" else response.data
            assert len(data) == size
    assert origin_server.count("/blob") == 1


# -- cache headers ---------------------------------------------------------------------------


def test_cache_headers_through_miss_hit_stale_and_refresh(build: Build, origin_server: Any,
                                                           clock: FakeClock) -> None:
    app = build({"items": http_source(origin_server.url + "/items?id={id}")}, clock=clock)
    client = app.test_client()

    miss = get(client, "items", id="1")
    assert (miss.headers["X-Cache"], miss.headers["Age"]) == ("MISS", "0")
    assert miss.headers["Cache-Control"] == FULL_CC
    etag = miss.headers["ETag"]
    assert len(etag) > 2 and etag.startswith('"') and etag.endswith('"')

    clock.advance(10)
    hit = get(client, "items", id="1")
    assert (hit.headers["X-Cache"], hit.headers["Age"]) == ("HIT", "10")
    # RFC 9111: the configured windows with Age, so a downstream cache computes
    # 60 - 10 = 50 s of freshness left (never "max-age=50" *and* "Age: 10").
    assert hit.headers["Cache-Control"] == FULL_CC
    assert hit.headers["ETag"] == etag
    assert hit.data == miss.data

    clock.advance(55)                                   # 65 s old: stale
    stale = get(client, "items", id="1")
    assert (stale.headers["X-Cache"], stale.headers["Age"]) == ("STALE", "65")
    assert stale.headers["Cache-Control"] == FULL_CC  # Age 65 > max-age 60: stale
    assert stale.get_json()["n"] == 1                   # the old value, at once
    assert swr(app).refresher.join(timeout=10)
    assert origin_server.count("/items") == 2           # one background refresh

    fresh = get(client, "items", id="1")
    assert (fresh.headers["X-Cache"], fresh.headers["Age"]) == ("HIT", "0")
    assert fresh.headers["Cache-Control"] == FULL_CC
    assert fresh.get_json()["n"] == 2
    assert fresh.headers["ETag"] != etag                # a new value, a new ETag


def test_if_none_match_gives_304_without_a_body(build: Build, origin_server: Any) -> None:
    app = build({"items": http_source(origin_server.url + "/items?id={id}"),
                 "echo": python_source("echo")})
    client = app.test_client()
    for name in ("items", "echo"):
        first = get(client, name, id="1")
        etag = first.headers["ETag"]
        for header in (etag, f'"nope", {etag}', "*"):
            response = client.get(f"/v1/{name}?id=1", headers={"If-None-Match": header})
            assert response.status_code == 304, (name, header)
            assert response.data == b""
            assert response.headers["ETag"] == etag
            assert response.headers["X-Cache"] == "HIT"
            assert "Cache-Control" in response.headers
        other = client.get(f"/v1/{name}?id=1", headers={"If-None-Match": '"other"'})
        assert other.status_code == 200 and other.data == first.data
    assert origin_server.count("/items") == 1


def test_if_none_match_with_a_weak_etag_gives_304(build: Build) -> None:
    client = build({"echo": python_source("echo")}).test_client()
    etag = get(client, "echo", id="1").headers["ETag"]
    response = client.get("/v1/echo?id=1", headers={"If-None-Match": f"W/{etag}"})
    assert (response.status_code, response.data) == (304, b"")


def test_if_none_match_with_an_old_etag_after_a_refresh_gives_the_new_body(
    build: Build, origin_server: Any, clock: FakeClock
) -> None:
    app = build({"items": http_source(origin_server.url + "/items?id={id}")}, clock=clock)
    client = app.test_client()
    old = get(client, "items", id="1").headers["ETag"]
    clock.advance(61)
    get(client, "items", id="1")                        # stale: refreshes in the background
    assert swr(app).refresher.join(timeout=10)
    response = client.get("/v1/items?id=1", headers={"If-None-Match": old})
    assert response.status_code == 200
    assert response.get_json()["n"] == 2


def test_head_answers_the_get_headers_without_a_body(build: Build, origin_server: Any,
                                                     clock: FakeClock) -> None:
    app = build({"items": http_source(origin_server.url + "/items?id={id}")}, clock=clock)
    client = app.test_client()
    cold = client.head("/v1/items?id=5")                # HEAD on a cold key fetches too
    assert (cold.status_code, cold.data, cold.headers["X-Cache"]) == (200, b"", "MISS")
    got = get(client, "items", id="5")
    head = client.head("/v1/items?id=5")
    assert (head.status_code, head.data) == (200, b"")
    for name in ("X-Cache", "Age", "Cache-Control", "ETag", "Content-Type"):
        assert head.headers[name] == got.headers[name], name
    assert head.headers["Content-Length"] == str(len(got.data))
    assert origin_server.count("/items") == 1


# -- errors -----------------------------------------------------------------------------------


def errors_app(build: Build, origin_server: Any) -> Flask:
    return build({"items": http_source(origin_server.url + "/items?id={id}"),
                  "echo": python_source("echo")})


def test_unknown_source_is_a_404(build: Build, origin_server: Any) -> None:
    client = errors_app(build, origin_server).test_client()
    body = assert_error(get(client, "nope"), 404, "nope")
    assert body["error"] == "not found"
    assert_error(client.get("/v1/nope/deeper"), 404)


def test_wrong_methods_are_405(build: Build, origin_server: Any) -> None:
    client = errors_app(build, origin_server).test_client()
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        response = client.open("/v1/items?id=1", method=method)
        assert_error(response, 405)
        assert "GET" in response.headers["Allow"]
    counter = client.get("/v1/counters/x")
    assert_error(counter, 405)
    assert "POST" in counter.headers["Allow"]
    assert origin_server.count() == 0


HOSTILE = [
    "line\r\nSet-Cookie: evil=1",
    "nul\x00byte",
    "x" * 10_240,
    "ü€😀 \u202e\ufeff",
    "../../etc/passwd",
    "%00%0d%0a",
    "{id}{0}{}",
    "' OR 1=1 --",
    "",
]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_parameter_values_never_give_a_500(build: Build, origin_server: Any,
                                                   value: str) -> None:
    client = errors_app(build, origin_server).test_client()
    echoed = get(client, "echo", v=value)
    assert echoed.status_code in (200, 400), echoed.data
    if echoed.status_code == 200:
        assert echoed.get_json() == {"v": value}
        assert "evil" not in "".join(echoed.headers.keys()).lower()
    fetched = get(client, "items", id=value)
    assert fetched.status_code in (200, 400), fetched.data
    if fetched.status_code == 200:
        assert fetched.get_json()["params"] == {"id": value}


@pytest.mark.parametrize("raw", [b"v=%ff%fe", b"v=%ED%A0%80", b"v=%", b"v=%zz&&&=&v",
                                 b"=1", b"v=1;x=2", b"v=" + b"%00" * 5000])
def test_malformed_query_strings_never_give_a_500(build: Build, origin_server: Any,
                                                  raw: bytes) -> None:
    client = errors_app(build, origin_server).test_client()
    for name in ("echo", "items"):
        query = raw.replace(b"v=", b"id=") if name == "items" else raw
        response = client.get(f"/v1/{name}?{query.decode('ascii')}")
        assert response.status_code in (200, 400), (name, raw, response.data)


def test_hostile_parameter_names_and_oversized_values_are_400(build: Build,
                                                              origin_server: Any) -> None:
    client = errors_app(build, origin_server).test_client()
    for name in ("id\r\nX-Evil: 1", "../id", "id\x00"):
        assert_error(get(client, "items", id="1", **{name: "1"}), 400, "unknown")
    assert_error(get(client, "echo", v="y" * 70_000), 400, "longer than")
    assert_error(get(client, "items", id="é" * 40_000), 400, "longer than")
    weird = get(client, "echo", **{"\r\n": "1", "../": "2", "\x00": "3"})
    assert weird.status_code in (200, 400)
    assert origin_server.count() == 0


# -- the listing ------------------------------------------------------------------------------


def test_listing_names_every_source_with_its_params_and_windows(build: Build,
                                                                origin_server: Any) -> None:
    client = composite_app(build, origin_server).test_client()
    response = client.get("/v1/")
    assert response.status_code == 200
    listed = {s["name"]: s for s in response.get_json()}
    assert set(listed) == {"a", "b", "p", "broken", "combo", "combo_broken"}
    assert listed["a"]["kind"] == "http"
    assert listed["a"]["params"] == {"required": ["id"], "optional": []}
    assert listed["p"]["kind"] == "python" and listed["p"]["executor"] == "thread"
    assert listed["p"]["params"]["required"] == ["x"]
    assert listed["combo"]["kind"] == "composite"
    assert listed["combo"]["parts"] == ["a", "b", "p"]
    assert sorted(listed["combo"]["params"]["required"]) == ["id", "x"]
    for source in listed.values():
        assert (source["max_age"], source["stale_while_revalidate"],
                source["stale_if_error"]) == (60, 600, 3600)
    assert origin_server.count() == 0                   # listing fetches nothing


# -- stale-if-error ---------------------------------------------------------------------------


def test_stale_if_error_serves_the_old_body_once_the_origin_fails(
    build: Build, origin_server: Any, clock: FakeClock
) -> None:
    app = build({"items": http_source(origin_server.url + "/items?id={id}")}, clock=clock)
    client = app.test_client()
    first = get(client, "items", id="1")
    assert first.headers["X-Cache"] == "MISS"
    origin_server.stop()                               # from now on the origin fails

    clock.advance(61)                                  # stale: served, refresh fails
    stale = get(client, "items", id="1")
    assert (stale.status_code, stale.headers["X-Cache"]) == (200, "STALE")
    assert stale.data == first.data
    assert swr(app).refresher.join(timeout=10)

    clock.advance(700)                                 # past stale-while-revalidate
    on_error = get(client, "items", id="1")
    assert (on_error.status_code, on_error.headers["X-Cache"]) == (200, "STALE")
    assert on_error.data == first.data
    assert on_error.headers["Cache-Control"] == first.headers["Cache-Control"]
    assert int(on_error.headers["Age"]) == 761
    assert on_error.headers["ETag"] == first.headers["ETag"]

    clock.advance(3600)                                # past stale-if-error: gone
    gone = get(client, "items", id="1")
    # A refused connection is an origin error: past stale_if_error it is a 502.
    assert_error(gone, 502)


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_annotated_parameters_are_converted_and_a_bad_value_is_the_callers_400(
        build: Build, executor: str) -> None:
    client = build({"typed": python_source("typed", executor)}).test_client()
    ok = get(client, "typed", n="3", ratio="0.5", flag="yes")
    assert ok.status_code == 200
    assert ok.get_json() == {"n": 3, "ratio": 0.5, "flag": True,
                             "types": ["int", "float", "bool"]}
    for params, name in (({"n": "abc"}, "'n'"), ({"n": "1", "ratio": "nan"}, "'ratio'"),
                         ({"n": "1", "flag": "maybe"}, "'flag'"), ({"n": "9" * 50}, "'n'")):
        assert_error(get(client, "typed", **params), 400, name)


def test_the_demo_says_a_bad_limit_is_the_callers_400(build: Build) -> None:
    client = build({"primes": {"kind": "python", "target": "service.http.demo:primes",
                               "executor": "thread", "max_age": 60}}).test_client()
    assert_error(get(client, "primes", limit="abc"), 400, "'limit'", "whole number")


def test_an_origin_error_does_not_poison_the_next_request_on_its_connection(
        build: Build, origin_server: Any) -> None:
    # The 503's body is not read: its connection must not be lent to the next request
    # (which would read that body as its own answer: a ProtocolError, a 502).
    client = build({"a": http_source(origin_server.url + "/a?id={id}"),
                    "broken": http_source(origin_server.url + "/broken?status=503&n={id}")}
                   ).test_client()
    for i in range(5):
        assert_error(get(client, "broken", id=str(i)), 502, "503")
        assert get(client, "a", id=str(i)).status_code == 200
