"""nginx in front, as a third cache tier: ``deploy/nginx.conf`` as shipped, in front of real
gunicorn (real memcached, the counting origin), or of a small upstream of the test's own for
the headers the service itself never sends.

What is proved: nginx's copy never outlives the service's windows (nginx ignores ``Age``;
``X-Accel-Expires`` carries what is left), a stale copy is answered at once while one
background request updates it, a stale copy on error only within ``stale-if-error``,
nothing marked uncacheable, ``private``, ``no-store`` or with ``Set-Cookie`` is stored,
and slow clients are held by nginx, away from gunicorn.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent.pywsgi import WSGIServer

from tests.servers import NginxFactory

pytestmark = [pytest.mark.memcached, pytest.mark.gunicorn]

SLACK = 0.5      # seconds: the loop's own step and scheduling on a busy machine


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    sent: float                     # time.monotonic() when the request was sent
    at: float                       # and when the answer was complete

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    @property
    def nginx(self) -> str | None:
        """What nginx did, from its ``Cache-Status`` line: HIT, STALE (on error), UPDATING,
        MISS, EXPIRED (a stale copy fetched again), BYPASS; None when it did not cache."""
        lines = [v for k, v in self.headers if k.lower() == "cache-status"]
        mine = [v for v in lines if v.startswith("nginx;")]
        if not mine:
            return None
        line = mine[0]
        for detail, name in (("detail=stale", "STALE"), ("detail=updating", "UPDATING"),
                             ("detail=revalidated", "REVALIDATED"), ("fwd=stale", "EXPIRED"),
                             ("fwd=bypass", "BYPASS"), ("fwd=uri-miss", "MISS")):
            if detail in line:
                return name
        return "HIT" if "; hit" in line else line

    @property
    def n(self) -> int:
        """The origin's fetch number of the value answered."""
        value: int = json.loads(self.body)["n"]
        return value


def fetch(url: str, path: str, headers: dict[str, str] | None = None,
          timeout: float = 10.0) -> Answer:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        sent = time.monotonic()
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return Answer(response.status, response.getheaders(), body, sent, time.monotonic())
    finally:
        conn.close()


def settings_file(tmp_path: Path, memcached: Any, origin: Any, key_prefix: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(f"""
[cache]
servers = ["{memcached.address}"]
key_prefix = "{key_prefix}"
l1_ttl = 0.2

[refresh]
lock_lease = 5
fetch_timeout = 10
xfetch_beta = 0

[sources.aged]
kind = "http"
url = "{origin.url}/aged?id={{id}}"
max_age = 4
stale_while_revalidate = 2

[sources.swr]
kind = "http"
url = "{origin.url}/swr?delay=0.3&id={{id}}"
max_age = 2
stale_while_revalidate = 30

[sources.sie]
kind = "http"
url = "{origin.url}/sie?id={{id}}"
max_age = 2
stale_if_error = 3

[sources.status]
kind = "http"
url = "{origin.url}/status?status={{status}}&id={{id}}"
max_age = 60
""")
    return path


@pytest.fixture
def service(tmp_path: Path, memcached: Any, origin_server: Any, gunicorn_factory: Any,
            key_prefix: str) -> Any:
    return gunicorn_factory(settings_file(tmp_path, memcached, origin_server, key_prefix),
                            workers=2)


@pytest.fixture
def front(service: Any, nginx_factory: NginxFactory) -> Any:
    return nginx_factory(f"{service.host}:{service.port}")


def test_the_copy_nginx_keeps_never_outlives_the_services_windows(
        service: Any, front: Any) -> None:
    # nginx 1.22 ignores Age: a copy 2 s into a 4 s window, stored as max-age=4, would be
    # answered as fresh until it is 6 s old. X-Accel-Expires tells nginx what is left.
    # Ages are measured from when the service's answer arrived (it stored the value
    # earlier) to when a request was sent (nginx chose its answer later): never more than
    # the true age, so a slow machine cannot turn this test red, only the copy's age.
    max_age, swr = 4, 2
    first = fetch(service.url, "/v1/aged?id=1")
    assert first.header("X-Cache") == "MISS"
    stored = first.at
    gevent.sleep(max(0.0, stored + 2.2 - time.monotonic()))
    seen: list[tuple[float, str | None, int]] = []
    while time.monotonic() < stored + max_age + swr + 2:
        answer = fetch(front.url, "/v1/aged?id=1")
        assert answer.status == 200
        seen.append((answer.sent - stored, answer.nginx, answer.n))
        gevent.sleep(0.05)
    ours = [(age, how) for age, how, n in seen if n == first.n]
    fresh = [age for age, how in ours if how == "HIT"]
    assert fresh, f"nginx never answered the copy from its cache: {seen[:5]}"
    # nginx counts whole seconds: its copy is fresh at most 1 s past the window's end.
    assert max(fresh) < max_age + 1 + SLACK, seen
    assert max(age for age, _ in ours) < max_age + swr + 1 + SLACK, seen
    assert any(n != first.n for _, _, n in seen)    # and the next value came through


def test_a_stale_copy_is_answered_at_once_while_one_request_updates_it(
        service: Any, front: Any, origin_server: Any) -> None:
    first = fetch(front.url, "/v1/swr?id=1")
    assert (first.status, first.nginx, first.header("X-Cache")) == (200, "MISS", "MISS")
    deadline = time.monotonic() + 5
    answer = first
    while answer.nginx in ("MISS", "HIT") and time.monotonic() < deadline:
        gevent.sleep(0.05)
        answer = fetch(front.url, "/v1/swr?id=1")
    # The first reader after nginx's copy expired got that copy, not a wait for the service.
    assert (answer.nginx, answer.n) == ("STALE", first.n), answer.headers
    burst = [gevent.spawn(fetch, front.url, "/v1/swr?id=1") for _ in range(20)]
    gevent.joinall(burst, raise_error=True)
    assert {a.value.nginx for a in burst} <= {"STALE", "UPDATING", "HIT"}
    deadline = time.monotonic() + 10
    while answer.n == first.n and time.monotonic() < deadline:
        gevent.sleep(0.1)
        answer = fetch(front.url, "/v1/swr?id=1")
    assert answer.n != first.n                       # updated in the background
    assert origin_server.count("/swr") <= 4          # not one fetch per reader (22)


def test_a_stale_copy_is_answered_on_error_only_within_stale_if_error(
        service: Any, front: Any) -> None:
    max_age, sie = 2, 3
    first = fetch(front.url, "/v1/sie?id=1")
    assert first.nginx == "MISS"
    stored = first.at                                # nginx stored it earlier
    service.stop(signal.SIGQUIT)                     # unreachable from now on
    seen: list[tuple[float, int, str | None]] = []
    answer = first
    while answer.status == 200 and time.monotonic() < stored + max_age + sie + 4:
        gevent.sleep(0.1)
        answer = fetch(front.url, "/v1/sie?id=1")
        seen.append((answer.sent - stored, answer.status, answer.nginx))
    assert any(how == "STALE" for _, _, how in seen), seen   # served stale on error...
    assert answer.status == 502, seen                        # ...then no more
    last_stale = max(age for age, status, _ in seen if status == 200)
    assert last_stale < max_age + sie + SLACK, seen


def test_what_the_service_passes_uncached_is_never_stored(
        service: Any, front: Any, origin_server: Any) -> None:
    for _ in range(2):
        passed = fetch(front.url, "/v1/status?status=404&id=1")
        assert (passed.status, passed.header("X-Cache")) == (404, "PASS")
        assert passed.nginx == "MISS" and passed.header("Cache-Control") is None
    assert origin_server.count("/status") == 2
    kept = [fetch(front.url, "/v1/status?status=200&id=1") for _ in range(2)]
    assert [a.nginx for a in kept] == ["MISS", "HIT"]          # the control: cacheable
    assert origin_server.count("/status") == 3


def test_headers_through_nginx(service: Any, front: Any) -> None:
    fetch(front.url, "/v1/status?status=200&id=h")
    hit = fetch(front.url, "/v1/status?status=200&id=h")
    assert hit.nginx == "HIT"
    statuses = [v for k, v in hit.headers if k.lower() == "cache-status"]
    assert statuses[0].startswith("swr-cache;") and statuses[-1] == "nginx; hit"
    assert hit.header("X-Accel-Expires") is None               # for nginx only
    assert hit.header("Cache-Control") is not None and hit.header("Age") is not None
    etag = hit.header("ETag")
    assert etag
    revalidated = fetch(front.url, "/v1/status?status=200&id=h",
                        headers={"If-None-Match": etag})
    assert (revalidated.status, revalidated.nginx, revalidated.body) == (304, "HIT", b"")
    # Credentials make a request the caller's own: passed, and its answer not stored.
    own = fetch(front.url, "/v1/status?status=200&id=h",
                headers={"Authorization": "Bearer x"})
    assert own.nginx == "BYPASS"


# -- headers the service itself never sends, from an upstream of the test's own ----------

HEADERS_BY_PATH = {
    "/public": [("Cache-Control", "max-age=60")],
    "/private": [("Cache-Control", "max-age=60, private")],
    "/no-store": [("Cache-Control", "max-age=60, no-store")],
    "/no-cache": [("Cache-Control", "max-age=60, no-cache")],
    "/cookie": [("Cache-Control", "max-age=60"), ("Set-Cookie", "session=1")],
    "/no-header": [],
}


@pytest.fixture
def own_upstream() -> Iterator[tuple[str, dict[str, int]]]:
    counts: dict[str, int] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]
        counts[path] = counts.get(path, 0) + 1
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  *HEADERS_BY_PATH.get(path, [])])
        return [f"{path} {counts[path]}".encode()]

    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    try:
        yield f"127.0.0.1:{server.server_port}", counts
    finally:
        server.stop(timeout=2)


def test_private_no_store_and_set_cookie_answers_are_never_stored(
        own_upstream: tuple[str, dict[str, int]], nginx_factory: NginxFactory) -> None:
    upstream, counts = own_upstream
    front = nginx_factory(upstream)
    for path in HEADERS_BY_PATH:
        for _ in range(2):
            assert fetch(front.url, path).status == 200
    assert counts == {"/public": 1, "/private": 2, "/no-store": 2, "/no-cache": 2,
                      "/cookie": 2, "/no-header": 2}


# -- slow clients -----------------------------------------------------------------------

def established(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (from /proc/net/tcp)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1
    return count


def test_slow_clients_are_held_by_nginx_not_by_gunicorn(service: Any, front: Any) -> None:
    # 500 connections trickling their request heads, a byte a second: nginx holds them in
    # its event loop and passes nothing on until a request is whole.
    slow: list[socket.socket] = []
    trickler = None
    try:
        for _ in range(500):
            sock = socket.create_connection((front.host, front.port), timeout=5)
            sock.sendall(b"GET /v1/status?status=200&id=s HTTP/1.1\r\nHost: x\r\n")
            slow.append(sock)
        assert established(front.port) >= len(slow)     # nginx holds them all

        def trickle() -> None:
            while True:
                for sock in slow:
                    # nginx closes a head still incomplete after client_header_timeout:
                    # that is the defence too, not an error here.
                    with contextlib.suppress(OSError):
                        sock.send(b"X")
                gevent.sleep(1.0)

        trickler = gevent.spawn(trickle)
        honest = [fetch(front.url, path, timeout=5)
                  for path in ("/healthz", "/v1/status?status=200&id=h") * 25]
        assert [a.status for a in honest] == [200] * 50
        # gunicorn saw none of them: its connections are nginx's few kept-alive ones.
        assert established(service.port) < 100
    finally:
        if trickler is not None:
            trickler.kill()
        for sock in slow:
            sock.close()
