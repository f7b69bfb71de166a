"""The fast path answers exactly like Flask (issue 9, item 1).

Every request is sent twice at the same (fake) instant: once with the fast path on, once
with it off (Flask's own dispatch through the region and ``httpcache.apply``). Status,
headers in order, body and the metrics each one moved must be identical; a counter on
Flask's side says which requests the fast path answered itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
from flask import Flask, Response, jsonify, request
from prometheus_client import REGISTRY

from service.app import swr
from service.flask.fastpath import FastPath
from service.flask.state import state_of
from service.readpath import keying
from tests.conftest import FakeClock, settings_for

pytestmark = pytest.mark.memcached


@pytest.fixture
def app(memcached: Any, make_app: Callable[..., Flask], clock: FakeClock) -> Flask:
    settings = settings_for([memcached.address], refresh={"xfetch_beta": 1.0}, sources={
        "echo": {"kind": "python", "target": "tests.sources_fixtures:echo",
                 "max_age": 60, "stale_while_revalidate": 600, "stale_if_error": 3600},
        "double": {"kind": "python", "target": "tests.sources_fixtures:double",
                   "max_age": 30},
    })
    app = make_app(settings, clock=clock)

    @app.get("/report")
    @swr.cached(max_age=60, stale_while_revalidate=600, vary=["Accept-Language"])
    def report() -> Response:
        resp = jsonify(region=request.args.get("region", "eu"),
                       lang=request.headers.get("Accept-Language", ""))
        resp.headers["X-Origin"] = "report"
        resp.headers.add("Link", "</a>; rel=preload")
        resp.headers.add("Link", "</b>; rel=preload")
        return resp

    @app.get("/text")
    @swr.cached(max_age=10, query_string=False)
    def text() -> str:
        return "plain text \u00e9"

    @app.get("/unless")
    @swr.cached(max_age=60, unless=lambda: False)
    def unless() -> str:
        return "not on the fast path"

    return app


class Counting:
    """Counts the requests that reached Flask."""

    def __init__(self, inner: Callable[..., Iterable[bytes]]) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.calls += 1
        return self.inner(environ, start_response)


def _metrics() -> dict[str, float]:
    out = {}
    for family in REGISTRY.collect():
        if family.name in ("cache_requests", "cache_tier_hits"):
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[s.name + repr(sorted(s.labels.items()))] = s.value
    return out


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def send(app: Flask, fast: bool, method: str, url: str, headers: dict[str, str]
         ) -> tuple[Any, dict[str, float]]:
    fp = app.wsgi_app
    assert isinstance(fp, FastPath)
    fp.enabled = fast
    before = _metrics()
    resp = app.test_client().open(url, method=method, headers=headers)
    answer = (resp.status, list(resp.headers.items()), resp.get_data())
    return answer, _delta(before, _metrics())


REQUESTS: list[tuple[str, str, dict[str, str], bool]] = [
    # method, url, headers, answered by the fast path once warm
    ("GET", "/v1/echo?a=1&b=x%26y", {}, True),
    ("GET", "/v1/echo?b=x%26y&a=1", {}, True),               # same key, other order
    ("HEAD", "/v1/echo?a=1&b=x%26y", {}, True),
    ("GET", "/v1/double?x=4", {}, True),
    ("GET", "/v1/double?x=4&y=1", {}, False),                 # 400: unknown parameter
    ("GET", "/v1/double", {}, False),                         # 400: missing parameter
    ("GET", "/v1/nope", {}, False),                           # 404
    ("GET", "/v1/", {}, False),                               # not a cached front door
    ("POST", "/v1/echo?a=1", {}, False),                      # 405
    ("GET", "/report?region=us", {}, True),
    ("GET", "/report?region=us", {"Accept-Language": "fr"}, True),
    ("HEAD", "/report?region=us", {"Accept-Language": "fr"}, True),
    ("GET", "/text?ignored=1", {}, True),
    ("GET", "/text/", {}, False),                             # 404 (or redirect)
    ("GET", "/unless", {}, False),
]


def test_each_answer_is_the_same_through_the_fast_path_and_through_flask(
        app: Flask, clock: FakeClock) -> None:
    fp = app.wsgi_app
    assert isinstance(fp, FastPath)
    flask_side = fp.wsgi_app = Counting(fp.wsgi_app)
    for method, url, headers, _ in REQUESTS:             # fill every entry (MISS)
        send(app, False, "GET" if method == "HEAD" else method, url, headers)
    clock.advance(1.0)                                   # Age 1, inside l1_ttl
    for method, url, headers, fast in REQUESTS:
        etag = dict(send(app, False, "GET", url, headers)[0][1]).get("ETag")
        variants = [headers]
        if etag:
            variants += [{**headers, "If-None-Match": etag},
                         {**headers, "If-None-Match": f'"other", W/{etag}'},
                         {**headers, "If-None-Match": '"other"'}]
        for h in variants:
            slow, slow_metrics = send(app, False, method, url, h)
            calls = flask_side.calls
            quick, quick_metrics = send(app, True, method, url, h)
            assert quick == slow, f"{method} {url} {h}"
            assert quick_metrics == slow_metrics, f"{method} {url} {h}"
            answered_fast = flask_side.calls == calls
            assert answered_fast is fast, f"{method} {url} {h}"
            if fast:
                assert dict(quick[1])["X-Cache"] == "HIT"
                assert quick_metrics, "the fast path counted nothing"


def test_stale_entries_and_entries_past_l1_ttl_fall_through(app: Flask,
                                                             clock: FakeClock) -> None:
    fp = app.wsgi_app
    assert isinstance(fp, FastPath)
    flask_side = fp.wsgi_app = Counting(fp.wsgi_app)
    client = app.test_client()
    assert client.get("/report").headers["X-Cache"] == "MISS"
    calls = flask_side.calls
    assert client.get("/report").headers["X-Cache"] == "HIT"
    assert flask_side.calls == calls                    # answered in front of Flask
    clock.advance(state_of(app).tiers.l1_ttl)           # memcached must be asked again
    assert client.get("/report").headers["X-Cache"] == "HIT"
    assert flask_side.calls == calls + 1
    clock.advance(60)                                   # stale now: Flask schedules it
    assert client.get("/report").headers["X-Cache"] == "STALE"
    assert flask_side.calls == calls + 2
    assert state_of(app).refresher.wait(keying.view_key("view/%s", "/report", []),
                                        timeout=10)


def test_the_rendered_answer_is_kept_with_the_local_entry_and_counted(app: Flask) -> None:
    client = app.test_client()
    client.get("/v1/double?x=21")
    client.get("/v1/double?x=21")
    local = state_of(app).tiers.local
    items = [i for i in local._items.values() if i.rendered]
    assert len(items) == 1 and items[0].rendered.body == b"42"
    assert local.bytes == sum(i.size for i in local._items.values())


def test_memoized_routes_keys_and_headers_answer_like_flask_on_every_repeat(
        app: Flask, clock: FakeClock) -> None:
    """The fast path memoizes the route per path, the key per raw query string (and
    ``vary`` values, and generation) and the headers per whole second of age: repeats,
    a 400 after a 200 on the same path, another ``vary`` value on the same query string,
    a new second of age and a bumped generation must still answer exactly as Flask."""

    fp = app.wsgi_app
    assert isinstance(fp, FastPath)
    flask_side = fp.wsgi_app = Counting(fp.wsgi_app)
    urls = [("/v1/double?x=4", {}), ("/v1/double?x=4&y=1", {}), ("/v1/double?x=5", {}),
            ("/report?region=us", {}), ("/report?region=us", {"Accept-Language": "fr"}),
            ("/report?region=us", {"Accept-Language": "de"}), ("/text?a=1", {}),
            ("/text?a=2", {})]

    def compare(expect_fast: bool | None = None) -> None:
        for url, headers in urls:
            for method in ("GET", "HEAD", "GET"):       # the second GET hits every memo
                slow, slow_metrics = send(app, False, method, url, headers)
                calls = flask_side.calls
                quick, quick_metrics = send(app, True, method, url, headers)
                assert quick == slow, f"{method} {url} {headers}"
                assert quick_metrics == slow_metrics, f"{method} {url} {headers}"
                if expect_fast is not None and "y=1" not in url:
                    assert (flask_side.calls == calls) is expect_fast, f"{method} {url}"

    for url, headers in urls:                            # fill (MISS)
        send(app, False, "GET", url, headers)
    clock.advance(0.2)
    compare(expect_fast=True)
    clock.advance(0.3)                                   # the same second of age
    compare(expect_fast=True)
    clock.advance(0.6)                                   # Age goes up by one
    compare(expect_fast=True)
    with app.test_request_context():
        state_of(app).generations.bump("double")   # every /v1/double key is new
    for url in ("/v1/double?x=4", "/v1/double?x=5"):     # no old-generation key served
        assert dict(send(app, True, "GET", url, {})[0][1])["X-Cache"] == "MISS"
    clock.advance(0.5)                                   # still inside l1_ttl (2 s)
    compare(expect_fast=True)


def test_the_memos_are_bounded(app: Flask, clock: FakeClock) -> None:
    fp = app.wsgi_app
    assert isinstance(fp, FastPath)
    fp.MEMO_LIMIT = 8
    client = app.test_client()
    for i in range(40):
        client.get(f"/v1/double?x={i}")
        client.get(f"/v1/double?x={i}")
        client.get(f"/text?n={i}")
    assert len(fp._routes) <= 8 and len(fp._keys) <= 8 and len(fp._answers) <= 8
    assert client.get("/v1/double?x=39").headers["X-Cache"] == "HIT"


def test_stale_reads_while_this_worker_refreshes_are_answered_like_flask(
        app: Flask, clock: FakeClock) -> None:
    """A STALE entry whose refresh already runs in this worker: Flask would serve the same
    copy and schedule nothing, so the fast path answers it, byte for byte the same; with
    no refresh running, Flask answers (it schedules the refresh)."""
    import gevent

    fp = app.wsgi_app
    assert isinstance(fp, FastPath)
    flask_side = fp.wsgi_app = Counting(fp.wsgi_app)
    refresher = state_of(app).refresher
    urls = [("/report?region=us", {}), ("/report?region=us", {"Accept-Language": "fr"}),
            ("/v1/echo?a=1", {})]
    for url, headers in urls:                            # fill (MISS)
        send(app, False, "GET", url, headers)
    keys = [_key_of(app, url, headers) for url, headers in urls]
    clock.advance(61.0)                                  # stale, inside swr
    refresher.start()
    for (url, headers), key in zip(urls, keys, strict=True):
        # Stands in for a refresh in flight: schedule() sees the key running.
        blocker = gevent.spawn(gevent.sleep, 30)
        refresher._running[key] = blocker
        try:
            send(app, False, "GET", url, headers)        # memcached confirms it (l1_ttl)
            for method, h in (("GET", headers), ("HEAD", headers), ("GET", headers)):
                slow, slow_metrics = send(app, False, method, url, h)
                calls = flask_side.calls
                quick, quick_metrics = send(app, True, method, url, h)
                assert quick == slow, f"{method} {url} {h}"
                assert quick_metrics == slow_metrics, f"{method} {url} {h}"
                assert flask_side.calls == calls, f"{method} {url}: not answered fast"
                assert dict(quick[1])["X-Cache"] == "STALE"
                etag = dict(quick[1])["ETag"]
                slow, _ = send(app, False, method, url, {**h, "If-None-Match": etag})
                quick, _ = send(app, True, method, url, {**h, "If-None-Match": etag})
                assert quick == slow and quick[0] == "304 NOT MODIFIED"
        finally:
            refresher._running.pop(key, None)
            blocker.kill()
        calls = flask_side.calls
        assert dict(send(app, True, "GET", url, headers)[0][1])["X-Cache"] == "STALE"
        assert flask_side.calls == calls + 1             # no refresh running: Flask's
        assert refresher.wait(key, timeout=10)


def _key_of(app: Flask, url: str, headers: dict[str, str]) -> str:
    """The key the fast path computes for ``url`` (the keys it memoized are Flask's)."""
    from werkzeug.test import EnvironBuilder

    fp = app.wsgi_app
    assert isinstance(fp, FastPath)
    environ = EnvironBuilder(path=url.split("?")[0], query_string=url.partition("?")[2],
                             headers=headers).get_environ()
    target = fp._target(environ)
    assert target is not None
    found = (fp._source(state_of(app), target, environ) if target.spec is None
             else fp._view(target, environ))
    assert found is not None
    return found[0]
