"""End to end: real gunicorn with deploy/gunicorn.conf.py, 4 workers, real memcached, an
in-test origin. Proves the fleet-wide claims where they matter: across worker processes."""

from __future__ import annotations

import http.client
import re
import signal
import time
from pathlib import Path
from typing import Any

import gevent
import pytest

pytestmark = [pytest.mark.memcached, pytest.mark.gunicorn]


def settings_file(tmp_path: Path, memcached: Any, origin: Any, key_prefix: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(f"""
[cache]
servers = ["{memcached.address}"]
key_prefix = "{key_prefix}"
l1_ttl = 0.2
pool_size = 16

[refresh]
lock_lease = 5
fetch_timeout = 10
xfetch_beta = 0

[server]
monitor_threshold = 1.0

[sources.slow]
kind = "http"
url = "{origin.url}/slow?delay=0.3&id={{id}}"
max_age = 1
stale_while_revalidate = 30
stale_if_error = 60

[sources.drain]
kind = "http"
url = "{origin.url}/drain?delay=2&id={{id}}"
max_age = 60
""")
    return path


def get(url: str, path: str, timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def settled(fleet: Any, origin: Any, path: str, source: str,
            timeout: float = 10.0, requests: int | None = None) -> tuple[int, str]:
    """The origin's count for ``path`` and a ``/metrics`` text that describe the same fetches.

    When the load stops, a refresh scheduled by one of the last STALE reads may not have
    started yet (its worker had no CPU), so "nothing in flight" alone can be seen before it
    runs. Wait (bounded) until nothing is in flight and every fetch the origin counted has
    an outcome in the metrics (and, given ``requests``, every request is counted: workers
    flush their counts every second); on timeout return what was last seen, for the
    asserts to show.
    """
    deadline = time.monotonic() + timeout
    while True:
        fetches = origin.count(path)          # read first: a later metric covers these
        text = get(fleet.url, "/metrics")[2].decode()
        outcomes = (metric(text, "cache_refreshes_total", source=source)
                    - metric(text, "cache_refreshes_total", source=source, outcome="skipped"))
        idle = metric(text, "cache_refreshes_in_flight") == 0
        counted = requests is None or metric(text, "cache_requests_total",
                                             source=source) == requests
        if (idle and outcomes == fetches and counted) or time.monotonic() > deadline:
            return fetches, text
        gevent.sleep(0.02)


@pytest.fixture
def fleet(tmp_path: Path, memcached: Any, origin_server: Any, gunicorn_factory: Any,
          key_prefix: str) -> Any:
    server = gunicorn_factory(settings_file(tmp_path, memcached, origin_server, key_prefix),
                              workers=4)
    assert len(server.worker_pids()) == 4
    return server


def test_cold_key_across_four_workers_is_fetched_once(fleet: Any, origin_server: Any) -> None:
    jobs = [gevent.spawn(get, fleet.url, "/v1/slow?id=cold") for _ in range(100)]
    gevent.joinall(jobs, raise_error=True)
    assert {j.value[0] for j in jobs} == {200}
    assert len({j.value[2] for j in jobs}) == 1          # everybody got the same value
    assert origin_server.count("/slow") == 1


def test_hot_key_is_fetched_once_per_window_and_counted_once_per_request(
    fleet: Any, origin_server: Any
) -> None:
    sent = 0
    statuses: dict[str, int] = {}

    def client(deadline: float) -> None:
        nonlocal sent
        while time.monotonic() < deadline:
            status, headers, _ = get(fleet.url, "/v1/slow?id=hot")
            assert status == 200
            statuses[headers["x-cache"]] = statuses.get(headers["x-cache"], 0) + 1
            sent += 1

    started = time.monotonic()
    gevent.joinall([gevent.spawn(client, started + 4.0) for _ in range(16)], raise_error=True)
    windows = (time.monotonic() - started) / 1.0                 # max_age = 1 s
    fetches, text = settled(fleet, origin_server, "/slow", "slow", requests=sent)
    print(f"{sent} requests, {fetches} fetches over {windows:.1f} windows: {statuses}")
    assert 1 <= fetches <= windows + 2                           # ~one per window, fleet-wide
    assert statuses.get("MISS", 0) <= 16                         # only the cold start waited
    # Every request of every worker is counted once, in one merged exposition.
    assert metric(text, "cache_requests_total", source="slow") == sent
    assert metric(text, "cache_refreshes_total", source="slow", outcome="ok") == fetches
    assert "cache_lease_total" in text and "memcached_pool_in_use" in text


def test_the_access_log_says_how_the_cache_answered_and_how_long_it_took(fleet: Any) -> None:
    for _ in range(3):
        assert get(fleet.url, "/v1/slow?id=logged")[0] == 200
    # Access lines are written in batches (deploy/gunicorn.conf.py): wait for them.
    # (The log is not a terminal: each line is JSON, its quotes escaped.)
    pattern = re.compile(r'\\?"GET /v1/slow\?id=logged HTTP/1.1\\?" 200 \d+ x_cache=(\w+) '
                         r'time=\d+\.\d+ ua=')
    deadline = time.monotonic() + 10
    while len(found := pattern.findall(fleet.log_text())) < 3 and time.monotonic() < deadline:
        gevent.sleep(0.05)
    # Each worker writes its own batches, so lines of different workers may come in any
    # order: one MISS (the first request), the others answered from the cache.
    assert len(found) == 3 and found.count("MISS") == 1
    assert set(found) <= {"MISS", "HIT", "STALE"}


def test_sigterm_during_load_finishes_in_flight_requests(fleet: Any, origin_server: Any) -> None:
    # 20 requests for cold keys: each waits ~2 s for the origin when SIGTERM arrives.
    jobs = [gevent.spawn(get, fleet.url, f"/v1/drain?id={i}") for i in range(20)]
    for _ in range(500):                                         # all of them in flight
        if origin_server.count("/drain") == 20:
            break
        gevent.sleep(0.02)
    assert origin_server.count("/drain") == 20
    code = fleet.stop(signal.SIGTERM, timeout=30)
    gevent.joinall(jobs, raise_error=True)
    assert [j.value[0] for j in jobs] == [200] * 20              # none was cut off
    assert code == 0
    log = fleet.log_text()
    assert "Traceback" not in log
    assert len(re.findall(r"Worker exiting", log)) == 4
