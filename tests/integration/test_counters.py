"""``POST /v1/counters/NAME``: one atomic counter for every worker of the fleet.

The cross-process test runs real gunicorn (4 gevent workers) on a real memcached and fires
200 concurrent callers at it from greenlets of this (monkey-patched) test process: every
value from 1 to 200 must be handed out exactly once, including on a counter that does not
exist yet (its creation races too).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import gevent.pool
import pytest
from flask import Flask

from tests.conftest import settings_for
from tests.servers import GunicornProcess, http_request

pytestmark = pytest.mark.memcached

CALLERS = 200


def write_settings(path: Path, memcached_address: str, key_prefix: str) -> Path:
    path.write_text(
        "[cache]\n"
        f'servers = ["{memcached_address}"]\n'
        f'key_prefix = "{key_prefix}"\n'
        "pool_size = 16\n"
        "[server]\n"
        'log_format = "text"\n',
        encoding="utf-8",
    )
    return path


def read_chars(pid: int) -> int:
    """Bytes the process has read from files and sockets so far (``rchar``)."""
    with open(f"/proc/{pid}/io", encoding="ascii") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError(f"no rchar in /proc/{pid}/io")


def quiet_read_chars(pids: list[int], timeout: float = 20.0) -> dict[int, int]:
    """``rchar`` of each process once none of them has read anything for a while.

    A freshly forked worker is still importing the app; waiting for that to settle makes
    the counts after the load say which workers served requests.
    """
    deadline = time.monotonic() + timeout
    last = {pid: read_chars(pid) for pid in pids}
    stable = 0
    while stable < 3:
        assert time.monotonic() < deadline, "the workers never settled"
        time.sleep(0.1)
        now = {pid: read_chars(pid) for pid in pids}
        stable = stable + 1 if now == last else 0
        last = now
    return last


def bump(server: GunicornProcess, name: str) -> int:
    status, headers, body = http_request("POST", f"{server.url}/v1/counters/{name}", body=b"",
                                         timeout=30)
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["name"] == name
    value = doc["value"]
    assert isinstance(value, int)
    return value


@pytest.mark.gunicorn
def test_counter_is_atomic_across_gunicorn_workers(memcached: Any, gunicorn_factory: Any,
                                                   tmp_path: Path, key_prefix: str) -> None:
    settings = write_settings(tmp_path / "settings.toml", memcached.address, key_prefix)
    server: GunicornProcess = gunicorn_factory(settings, workers=4)
    workers = server.worker_pids()
    assert len(workers) == 4
    before = quiet_read_chars(workers)

    pool = gevent.pool.Pool(CALLERS)
    callers = [pool.spawn(bump, server, "visits") for _ in range(CALLERS)]
    pool.join(timeout=60, raise_error=True)
    assert all(c.ready() for c in callers), "callers still running after 60 s"
    values = [c.get() for c in callers]
    assert sorted(values) == list(range(1, CALLERS + 1))

    # The callers really were spread over several processes (each served one read).
    busy = [pid for pid in workers if read_chars(pid) - before[pid] > 500]
    assert len(busy) >= 2, f"only workers {busy} of {workers} served requests"

    # Another name is another counter; this one continues where it was.
    assert bump(server, "other") == 1
    assert bump(server, "visits") == CALLERS + 1


def test_counter_in_one_process_counts_from_one(memcached: Any,
                                                make_app: Callable[..., Flask]) -> None:
    client = make_app(settings_for([memcached.address])).test_client()
    assert [client.post("/v1/counters/hits").get_json()["value"] for _ in range(3)] == [1, 2, 3]
    odd = "a/b ü\u00e9 x"                               # any name: the key is hashed
    response = client.post(f"/v1/counters/{odd}")
    assert (response.status_code, response.get_json()) == (200, {"name": odd, "value": 1})


def test_counter_name_too_long_is_a_400(memcached: Any,
                                        make_app: Callable[..., Flask]) -> None:
    client = make_app(settings_for([memcached.address])).test_client()
    response = client.post("/v1/counters/" + "n" * 201)
    assert response.status_code == 400
    assert set(response.get_json()) >= {"error", "detail"}


@pytest.mark.private_memcached
def test_counter_without_memcached_is_a_503_not_a_500(memcached: Any,
                                                       make_app: Callable[..., Flask]) -> None:
    client = make_app(settings_for([memcached.address])).test_client()
    assert client.post("/v1/counters/c").get_json()["value"] == 1
    memcached.stop()
    for _ in range(5):          # through connection errors, then with the circuit open
        response = client.post("/v1/counters/c")
        assert response.status_code == 503, response.data
        assert response.mimetype == "application/json"
        body = response.get_json()
        assert body["error"] == "unavailable"
        assert "memcached" in body["detail"]
    memcached.restart()         # back, and empty: counters are volatile
    deadline = time.monotonic() + 10
    while (response := client.post("/v1/counters/c")).status_code == 503:
        assert time.monotonic() < deadline, "memcached was not used again"
        time.sleep(0.05)
    assert (response.status_code, response.get_json()["value"]) == (200, 1)
