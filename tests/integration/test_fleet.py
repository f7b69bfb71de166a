"""The fleet-wide lease across real processes (SPEC: one origin fetch per key per window,
fleet-wide; waiters get the holder's value when it lands, or fetch themselves once the
lease lapses).

Each "worker" is a ``python -m tests.fleet_worker`` process with its own app and memcached
pool, all sharing one memcached and one counting origin. The processes are started, then
released together through their stdin (``go``), so nothing here sleeps to line them up:
every wait is on an observable event (a line on a pipe, the origin's request count).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from flask import Flask

from service.flask.state import AppState, state_of
from service.observe import metrics
from service.readpath.freshness import Windows
from service.readpath.loader import Job
from tests.conftest import settings_for
from tests.servers import REPO_ROOT, OriginServer, log_tail

pytestmark = pytest.mark.memcached

W = Windows(60, 600, 3600)
START_TIMEOUT = 30.0     # a worker imports Flask, gevent, prometheus... then says "ready"
RESULT_TIMEOUT = 30.0
EVENT_TIMEOUT = 10.0


class Worker:
    """A running ``tests.fleet_worker`` process, driven line by line through its pipes."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log)

    def describe(self) -> str:
        return (f"worker pid={self.proc.pid} exit={self.proc.poll()}; stderr tail:\n"
                f"{log_tail(self.log_path)}")

    def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        try:
            with gevent.Timeout(timeout):
                line = self.proc.stdout.readline()
        except gevent.Timeout:
            pytest.fail(f"no line from the worker within {timeout:g}s; {self.describe()}")
        if not line:
            pytest.fail(f"the worker closed its stdout; {self.describe()}")
        text: str = line.decode().strip()
        return text

    def expect(self, word: str, timeout: float = EVENT_TIMEOUT) -> None:
        line = self.readline(timeout)
        assert line == word, f"expected {word!r}, got {line!r}; {self.describe()}"

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word.encode() + b"\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = RESULT_TIMEOUT) -> dict[str, Any]:
        """The worker's final JSON line; it must then exit 0."""
        line = self.readline(timeout)
        doc: dict[str, Any] = json.loads(line)
        assert "error" not in doc, f"{doc['error']}; {self.describe()}"
        assert self.proc.wait(timeout=timeout) == 0, self.describe()
        return doc

    def kill(self) -> None:
        """SIGKILL (if still running) and reap; close our ends of the pipes."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


StartWorker = Callable[..., Worker]


@pytest.fixture
def start_worker(memcached: Any, origin_server: OriginServer, tmp_path: Path,
                 key_prefix: str) -> Iterator[StartWorker]:
    """Start fleet workers on the test's memcached, key prefix and origin; each answers
    ``ready`` before this returns. Every worker is killed and reaped at teardown, whatever
    happened."""
    with contextlib.ExitStack() as stack:
        started: list[Worker] = []

        def start(key: str, greenlets: int, path: str, *extra: str) -> Worker:
            argv = [sys.executable, "-m", "tests.fleet_worker",
                    "--memcached", memcached.address, "--key-prefix", key_prefix,
                    "--origin", origin_server.url,
                    "--key", key, "--greenlets", str(greenlets), "--path", path, *extra]
            worker = Worker(argv, tmp_path / f"fleet-worker-{len(started)}.log")
            stack.callback(worker.kill)
            started.append(worker)
            worker.expect("ready", timeout=START_TIMEOUT)
            return worker

        yield start


def swr(app: Flask) -> AppState:
    cache: AppState = state_of(app)
    return cache


def http_json(url: str) -> Callable[[], Any]:
    """A fetch function like the workers': GET ``url`` and decode its JSON."""

    def fetch() -> Any:
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read().decode("utf-8"))

    return fetch


def lease_count(outcome: str) -> float:
    value: float = metrics.lease_total.labels(outcome)._value.get()
    return value


def wait_until(condition: Callable[[], bool], what: str, timeout: float = EVENT_TIMEOUT) -> None:
    """Poll an observable condition with short cooperative sleeps, for at most ``timeout``."""
    with gevent.Timeout(timeout, AssertionError(f"timed out waiting for {what}")):
        while not condition():
            gevent.sleep(0.01)


def test_four_processes_of_fifty_greenlets_make_one_fetch(
    start_worker: StartWorker, origin_server: OriginServer
) -> None:
    workers = [start_worker("fleet-key", 50, "/slow?delay=0.5",
                            "--lock-lease", "5", "--fetch-timeout", "10") for _ in range(4)]
    for worker in workers:
        worker.send("go")
    results = [worker.result() for worker in workers]

    statuses = [s for r in results for s in r["statuses"]]
    values = [v for r in results for v in r["values"]]
    print("statuses:", dict(Counter(statuses)))
    for i, r in enumerate(results):
        print(f"worker {i}: statuses={dict(Counter(r['statuses']))} lease={r['lease']} "
              f"refreshes={r['refreshes']}")
    assert origin_server.count("/slow") == 1
    assert len(values) == 200
    assert all(v == values[0] for v in values), values
    assert values[0] == {"path": "/slow", "params": {"delay": "0.5"}, "n": 1}
    assert set(statuses) <= {"MISS", "HIT", "STALE"}
    assert sum(r["refreshes"].get("ok", 0) for r in results) == 1   # one fetch, one store


def test_sigkilled_holder_lease_lapses_and_another_worker_fetches(
    start_worker: StartWorker, origin_server: OriginServer, memcached: Any,
    make_app: Callable[..., Flask]
) -> None:
    # lock_lease 2, not 1: memcached expires items on whole-second ticks, so an item set
    # with exptime 1 lives anywhere in (0, 1] s, shorter than the renewal interval (1/3 s)
    # allows; a live holder with a 1 s lease loses it by itself (see the report).
    holder = start_worker("sigkill-key", 1, "/slow?delay=30",
                          "--lock-lease", "2", "--fetch-timeout", "60")
    app = make_app(settings_for([memcached.address],
                                refresh={"lock_lease": 2.0, "fetch_timeout": 5.0}))
    holder.send("go")
    wait_until(lambda: origin_server.count("/slow") == 1, "the holder's request to the origin")
    with app.app_context():
        assert swr(app).leases.holder("sigkill-key") is not None   # it holds the lease
    holder.kill()                                                  # SIGKILL, mid-fetch
    assert holder.proc.returncode == -9

    waited = lease_count("waited")
    with app.app_context():
        result = swr(app).region.get_or_load(
            Job("sigkill-key", http_json(origin_server.url + "/fast"), W, source="test"))
    assert result.status == "MISS"
    assert result.value == {"path": "/fast", "params": {}, "n": 1}
    # The claim was still there at first: the reader waited for it to lapse, then won.
    assert lease_count("waited") > waited
    assert origin_server.count("/slow") == 1
    assert origin_server.count("/fast") == 1
    with app.app_context():
        found = swr(app).tiers.read_shared("sigkill-key")
        assert swr(app).leases.holder("sigkill-key") is None       # released after the write
    assert found is not None and found.entry.value == result.value


def test_slow_holder_cannot_overwrite_newer_value_across_processes(
    start_worker: StartWorker, origin_server: OriginServer, memcached: Any,
    make_app: Callable[..., Flask]
) -> None:
    # --gate: the worker's fetch gets its answer from the origin, says "fetched", and then
    # waits for "finish": it holds the lease (renewing it) for as long as the test wants.
    holder = start_worker("fence-key", 1, "/old", "--lock-lease", "5", "--fetch-timeout", "60",
                          "--gate")
    app = make_app(settings_for([memcached.address],
                                refresh={"lock_lease": 5.0, "fetch_timeout": 5.0}))
    cache = swr(app)
    holder.send("go")
    holder.expect("fetched")

    # The claim's item vanishes (evicted, or its server restarted): delete it behind the
    # holder's back with the raw protocol. The key is the SWR store's (Flask-Caching's).
    with app.app_context():
        mkey = cache.tiers.store.key("fence-key")
    assert memcached.raw_get(mkey) is not None
    assert memcached.command_line(b"delete " + mkey) == b"DELETED"

    # Another worker (this process) now gets the lease, fetches and stores a newer value.
    acquired = lease_count("acquired")
    with app.app_context():
        newer = cache.region.get_or_load(
            Job("fence-key", http_json(origin_server.url + "/new"), W, source="test"))
    assert lease_count("acquired") == acquired + 1
    assert (newer.status, newer.value) == ("MISS", {"path": "/new", "params": {}, "n": 1})

    holder.send("finish")                       # the old holder's fetch finishes late
    old = holder.result()
    print("old holder: lease", old["lease"], "refreshes", old["refreshes"])
    assert old["statuses"] == ["MISS"]
    # Its write was refused, and its late value is not answered either: its caller gets
    # the value that is stored.
    assert old["values"] == [newer.value]
    assert old["lease"].get("fenced") == 1
    with app.app_context():
        found = cache.tiers.read_shared("fence-key")
    assert found is not None
    assert found.entry.value == newer.value     # ...and the newer value stays
    assert origin_server.count("/old") == 1
    assert origin_server.count("/new") == 1


def test_a_paused_holder_loses_its_claim_and_its_late_write_is_fenced(
    start_worker: StartWorker, origin_server: OriginServer, memcached: Any,
    make_app: Callable[..., Flask]
) -> None:
    # SIGSTOP: the holder is alive but renews nothing (a stop-the-world pause, a frozen
    # VM). Its claim lapses on memcached's clock; another worker wins the key and stores.
    holder = start_worker("pause-key", 1, "/old", "--lock-lease", "2", "--fetch-timeout",
                          "60", "--gate")
    app = make_app(settings_for([memcached.address],
                                refresh={"lock_lease": 2.0, "fetch_timeout": 10.0}))
    holder.send("go")
    holder.expect("fetched")
    os.kill(holder.proc.pid, signal.SIGSTOP)
    try:
        with app.app_context():
            newer = swr(app).region.get_or_load(
                Job("pause-key", http_json(origin_server.url + "/new"), W, source="test"))
    finally:
        os.kill(holder.proc.pid, signal.SIGCONT)
    assert (newer.status, newer.value["path"]) == ("MISS", "/new")
    holder.send("finish")                       # the paused holder's write lands late
    old = holder.result()
    assert old["lease"].get("fenced") == 1      # refused: the claim's item changed
    assert old["values"] == [newer.value]       # and its late value is not answered
    with app.app_context():
        found = swr(app).tiers.read_shared("pause-key")
    assert found is not None and found.entry.value == newer.value


# -- regressions: both of these once made the origin get two requests ----------------


def test_a_live_holder_keeps_a_one_second_lease_through_a_longer_fetch(
    start_worker: StartWorker, origin_server: OriginServer
) -> None:
    """memcached expires on whole-second ticks; the lease item gets one spare second."""
    workers = [start_worker("short-lease-key", 1, "/slow?delay=3",
                            "--lock-lease", "1", "--fetch-timeout", "10") for _ in range(2)]
    for worker in workers:
        worker.send("go")
    results = [worker.result() for worker in workers]
    print("lease:", [r["lease"] for r in results])
    assert origin_server.count("/slow") == 1


def test_a_holder_renews_its_lease_while_its_readers_fill_the_pool(
    start_worker: StartWorker, origin_server: OriginServer
) -> None:
    """Waiting readers give their pooled connection back, so the renewer gets one."""
    workers = [start_worker("full-pool-key", 50, "/slow?delay=4", "--pool-size", "4",
                            "--lock-lease", "2", "--fetch-timeout", "10") for _ in range(2)]
    for worker in workers:
        worker.send("go")
    results = [worker.result() for worker in workers]
    print("lease:", [r["lease"] for r in results])
    assert origin_server.count("/slow") == 1
