"""``POST /v1/counters/NAME``: one atomic counter for every worker of the fleet, whose
every number is unique.

The cross-process test runs real gunicorn (4 gevent workers) on a real memcached and fires
200 concurrent callers at it from greenlets of this (monkey-patched) test process: 200
consecutive values must be handed out exactly once each, including on a counter that does
not exist yet (its creation races too). The fault tests freeze, restart and kill the
counter's memcached under load (real processes, real signals) and collect every number
handed out: none twice, none going backwards for a caller.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.pool
import gevent.server
import pytest
from flask import Flask

from service.flask.state import state_of
from service.http.counters import PER_SECOND, usable
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
    values = sorted(c.get() for c in callers)
    assert values == list(range(values[0], values[0] + CALLERS))
    assert usable(values[0])

    # The callers really were spread over several processes (each served one read).
    busy = [pid for pid in workers if read_chars(pid) - before[pid] > 500]
    assert len(busy) >= 2, f"only workers {busy} of {workers} served requests"

    # Another name is another counter; this one continues where it was.
    assert usable(bump(server, "other"))
    assert bump(server, "visits") == values[-1] + 1


def test_counter_in_one_process_counts_by_one_from_its_floor(
        memcached: Any, make_app: Callable[..., Flask]) -> None:
    client = make_app(settings_for([memcached.address])).test_client()
    first, *rest = [client.post("/v1/counters/hits").get_json()["value"] for _ in range(3)]
    assert rest == [first + 1, first + 2]
    # It starts at its server's clock in microseconds (memcached runs on this machine).
    assert abs(first / PER_SECOND - time.time()) < 10
    odd = "a/b ü\u00e9 x"                               # any name: the key is hashed
    response = client.post(f"/v1/counters/{odd}")
    assert response.status_code == 200
    assert response.get_json()["name"] == odd and usable(response.get_json()["value"])


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
    first = client.post("/v1/counters/c").get_json()["value"]
    memcached.stop()
    for _ in range(5):          # through connection errors, then with the circuit open
        response = client.post("/v1/counters/c")
        assert response.status_code == 503, response.data
        assert response.mimetype == "application/json"
        body = response.get_json()
        assert body["error"] == "unavailable"
        assert "memcached" in body["detail"]
    memcached.restart()         # back, and empty: the counter starts again above its past
    deadline = time.monotonic() + 10
    while (response := client.post("/v1/counters/c")).status_code == 503:
        assert time.monotonic() < deadline, "memcached was not used again"
        time.sleep(0.05)
    assert response.status_code == 200 and response.get_json()["value"] > first


# -- faults under load: every number handed out is unique ---------------------------------

CONCURRENT = 24
FREEZE_SECONDS = 3.0
EVENT_TIMEOUT = 30.0


class Answers:
    """Every answer of every caller, in the order each caller got them."""

    def __init__(self) -> None:
        self.log: list[tuple[int, int, int | None]] = []   # (caller, status, value)

    def ok_since(self, mark: int) -> int:
        return sum(1 for _, status, _ in self.log[mark:] if status == 200)

    def statuses(self, start: int = 0, end: int | None = None) -> list[int]:
        return [status for _, status, _ in self.log[start:end]]

    def check(self) -> tuple[int, int]:
        """Assert no number twice and none backwards for a caller; (duplicates, 503s)."""
        values = [value for _, _, value in self.log if value is not None]
        duplicates = len(values) - len(set(values))
        assert duplicates == 0, f"{duplicates} numbers handed out twice"
        last: dict[int, int] = {}
        for caller, _, value in self.log:
            if value is not None:
                assert value > last.get(caller, 0), f"caller {caller} went back to {value}"
                last[caller] = value
        assert set(self.statuses()) <= {200, 503}, set(self.statuses())
        assert all(usable(v) for v in values)
        return duplicates, self.statuses().count(503)


def run_callers(post: Callable[[], tuple[int, int | None]], answers: Answers,
                stop: gevent.event.Event, callers: int = CONCURRENT) -> list[gevent.Greenlet]:
    def caller(i: int) -> None:
        while not stop.is_set():
            status, value = post()
            answers.log.append((i, status, value))
            if status != 200:
                gevent.sleep(0.02)      # a refused caller asks again, as a client would
    return [gevent.spawn(caller, i) for i in range(callers)]


def wait_for(condition: Callable[[], bool], what: str) -> None:
    with gevent.Timeout(EVENT_TIMEOUT, AssertionError(f"timed out waiting for {what}")):
        while not condition():
            gevent.sleep(0.05)


@pytest.mark.gunicorn
@pytest.mark.private_memcached
def test_no_number_is_handed_out_twice_across_a_freeze_and_a_restart(
        memcached: Any, gunicorn_factory: Any, tmp_path: Path, key_prefix: str) -> None:
    settings = write_settings(tmp_path / "settings.toml", memcached.address, key_prefix)
    server: GunicornProcess = gunicorn_factory(settings, workers=2)

    def post() -> tuple[int, int | None]:
        status, _, body = http_request("POST", f"{server.url}/v1/counters/tickets", body=b"",
                                       timeout=30)
        return status, json.loads(body)["value"] if status == 200 else None

    answers, stop = Answers(), gevent.event.Event()
    callers = run_callers(post, answers, stop)
    try:
        wait_for(lambda: answers.ok_since(0) >= 100, "the callers to get going")
        frozen_at = len(answers.log)
        memcached.freeze()
        try:
            gevent.sleep(FREEZE_SECONDS)
        finally:
            memcached.thaw()
        thawed_at = len(answers.log)
        wait_for(lambda: answers.ok_since(thawed_at) >= 100, "numbers after the thaw")
        before_restart = max(v for _, _, v in answers.log if v is not None)
        memcached.restart()      # killed and started again on its port: the counter is gone
        restarted_at = len(answers.log)
        wait_for(lambda: answers.ok_since(restarted_at) >= 100, "numbers after the restart")
    finally:
        stop.set()
        gevent.joinall(callers, timeout=EVENT_TIMEOUT)
        gevent.killall(callers)
    duplicates, refused = answers.check()
    assert 503 in answers.statuses(frozen_at, thawed_at)   # the freeze did bite
    after = [v for _, _, v in answers.log[restarted_at:] if v is not None]
    assert min(after) > before_restart                       # started again above its past
    frozen = answers.statuses(frozen_at, restarted_at).count(503)
    print(f"\ncounters: {len(answers.log)} requests, {duplicates} duplicates, {refused} "
          f"answered 503 ({frozen} around the {FREEZE_SECONDS:g} s freeze, "
          f"{refused - frozen} around the restart)")


@pytest.mark.private_memcached
def test_a_counter_lost_in_the_second_it_was_created_does_not_start_there_again(
        memcached: Any, make_app: Callable[..., Flask]) -> None:
    # memcached's clock has one-second ticks: a flush or a restart within the second the
    # counter was created must not hand out that second's numbers again.
    client = make_app(settings_for([memcached.address])).test_client()
    seen: list[int] = []

    def bumped() -> bool:           # the first call after a restart meets a dead socket
        answer = client.post("/v1/counters/quick")
        if answer.status_code == 200:
            seen.append(answer.get_json()["value"])
        return answer.status_code == 200

    for lose in (memcached.flush, memcached.flush, memcached.restart, memcached.restart):
        wait_for(bumped, "the counter")
        lose()                                     # at once: usually within that second
    wait_for(bumped, "the counter")
    assert seen == sorted(set(seen)), seen


def test_a_counter_never_moves_to_another_server(memcached_factory: Any,
                                                 make_app: Callable[..., Flask]) -> None:
    servers = {s.address: s for s in (memcached_factory() for _ in range(3))}
    app = make_app(settings_for(list(servers)))
    client = app.test_client()
    mkey = state_of(app).store.child("counter").key("moves")
    home = state_of(app).pool.server_for(mkey)

    def post() -> tuple[int, int | None]:
        response = client.post("/v1/counters/moves")
        return response.status_code, (response.get_json()["value"]
                                      if response.status_code == 200 else None)

    answers = Answers()
    for _ in range(5):
        answers.log.append((0, *post()))
    other = next(a for a in servers if a != home)
    servers[other].kill()                           # another server dies: nothing changes
    for _ in range(5):
        answers.log.append((0, *post()))
    values = [v for _, _, v in answers.log]
    assert values == list(range(values[0], values[0] + 10))
    servers[home].kill()                            # its own server dies: refused, not moved
    dead_at = len(answers.log)
    for _ in range(10):
        answers.log.append((0, *post()))
    assert set(answers.statuses(dead_at)) == {503}
    assert all(servers[a].raw_get(mkey) is None for a in servers if a not in (home, other))
    servers[home].restart()
    wait_for(lambda: post()[0] == 200, "the counter's server to be used again")
    answers.log.append((0, *post()))
    assert answers.log[-1][2] is not None and answers.log[-1][2] > values[-1]
    answers.check()


class DelayingProxy:
    """A TCP proxy in front of memcached that holds the next request back ``delay`` seconds:
    what a segment lost once or twice costs (Linux retransmits after 200 ms, then 400 ms)."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target, self.delay = target, delay
        self.delay_next = False
        self.delayed = 0
        self.pumps: list[gevent.Greenlet] = []
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_port}"

    def _handle(self, downstream: socket.socket, _: Any) -> None:
        upstream = socket.create_connection(self.target, timeout=5)
        self.pumps.append(gevent.spawn(self._pump, upstream, downstream, False))
        self._pump(downstream, upstream, True)

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        try:
            while data := source.recv(65536):
                if requests and self.delay_next:
                    self.delay_next = False
                    self.delayed += 1
                    gevent.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            source.close()
            sink.close()

    def stop(self) -> None:
        self.server.stop(timeout=1)
        gevent.killall(self.pumps)


@pytest.fixture
def delaying_proxy(memcached: Any) -> Iterator[DelayingProxy]:
    host, port = memcached.address.rsplit(":", 1)
    proxy = DelayingProxy((host, int(port)), delay=0.6)
    yield proxy
    proxy.stop()


def test_an_increment_survives_a_lost_segment(delaying_proxy: DelayingProxy,
                                              make_app: Callable[..., Flask]) -> None:
    # The shared timeout is shorter than one retransmission; the counter's is not.
    app = make_app(settings_for([delaying_proxy.address],
                                cache={"timeout": 0.25, "connect_timeout": 0.25}))
    client = app.test_client()
    first = client.post("/v1/counters/lossy").get_json()["value"]
    delaying_proxy.delay_next = True                # the next incr's segment is "lost"
    response = client.post("/v1/counters/lossy")
    assert delaying_proxy.delayed == 1
    assert (response.status_code, response.get_json()["value"]) == (200, first + 1)
    # The connection went back to the pool with the shared timeout: other calls keep it.
    conn = state_of(app).pool.acquire()
    try:
        client_ = conn._clients.get(delaying_proxy.address)
        assert client_ is None or client_.timeout == 0.25
    finally:
        state_of(app).pool.release(conn)


@pytest.mark.parametrize("garbage", [
    b"not a number", b"57", b"9" * 40, b"18446744073709551615", b"9007199254740993",
    b"-5", b"1e400", b"nan", b"inf",
])
def test_anything_else_under_a_counter_is_replaced_never_repeated(
        memcached: Any, make_app: Callable[..., Flask], garbage: bytes) -> None:
    app = make_app(settings_for([memcached.address], cache={"pool_size": 16}))
    memcached.raw_set(state_of(app).store.child("counter").key("g"), garbage)
    clients = [app.test_client() for _ in range(30)]
    # Thirty callers find the garbage together: exactly one of them replaces it.
    jobs = [gevent.spawn(c.post, "/v1/counters/g") for c in clients]
    gevent.joinall(jobs, timeout=EVENT_TIMEOUT, raise_error=True)
    answers = [job.get() for job in jobs]
    assert {a.status_code for a in answers} == {200}
    values = [a.get_json()["value"] for a in answers]
    assert len(set(values)) == 30 and all(usable(v) for v in values)
    assert sorted(values) == list(range(min(values), min(values) + 30))
