"""The load protocol's figures: ``python -m bench.protocol`` (part of ``make bench``).

1. **Nobody queues behind an uncacheable answer.** Eight concurrent requests to a view
   that takes 1 s and ends in ``abort(404)``: the slowest answer, for plain Flask (the
   baseline a user would otherwise run), ``@swr.cached``, and an unchanged Flask-Caching
   app whose ``CACHE_TYPE`` names our backend. Two bursts: the first has a holder (nobody
   can know its answer is uncacheable before it ends), the second meets the pass record.
2. **A lost entry costs no wait.** 32 greenlets read 30 warm keys of a 3 s origin in a loop
   (``l1_ttl`` 0.2 s); memcached is restarted empty; the slowest read before and after.

In one process monkey-patched like a gunicorn gevent worker, against a private memcached.
Timing lives here, not in the test suite.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from flask import Flask, abort  # noqa: E402
from flask_caching import Cache  # noqa: E402

from service import SWR  # noqa: E402
from service.config import parse_settings  # noqa: E402
from service.flask.state import state_of  # noqa: E402
from service.readpath.freshness import Windows  # noqa: E402
from service.readpath.loader import Job  # noqa: E402
from tests.servers import MemcachedProcess  # noqa: E402


def slow_404() -> str:
    gevent.sleep(1.0)
    abort(404)


def app_for(kind: str, address: str) -> Flask:
    app = Flask(f"bench-{kind}")
    app.config.update(CACHE_TYPE="service.backend.MemcachedCache",
                      CACHE_MEMCACHED_SERVERS=[address], CACHE_KEY_PREFIX=f"b{kind}")
    if kind == "flask":
        app.get("/missing")(slow_404)
    elif kind == "swr":
        swr = SWR()
        app.get("/missing")(swr.cached(timeout=60)(slow_404))
        swr.init_app(app, parse_settings({"cache": {"servers": [address],
                                                    "key_prefix": "bswr"}}, "<bench>"))
    else:
        cache = Cache(app)
        app.get("/missing")(cache.cached(timeout=60)(slow_404))
    return app


def burst(app: Flask) -> float:
    started = time.perf_counter()

    def one() -> float:
        app.test_client().get("/missing")
        return time.perf_counter() - started

    jobs = [gevent.spawn(one) for _ in range(8)]
    gevent.joinall(jobs, raise_error=True)
    return max(j.value for j in jobs)


def uncacheable(address: str) -> None:
    print("8 concurrent requests to a 1 s view that aborts 404: the slowest answer")
    for kind, label in (("flask", "plain Flask"), ("swr", "@swr.cached"),
                        ("fc", "Flask-Caching, CACHE_TYPE switched")):
        app = app_for(kind, address)
        first, second = burst(app), burst(app)
        print(f"  {label:36} first burst {first:5.2f} s, second burst {second:5.2f} s")
        if kind == "swr":
            state_of(app).refresher.stop(timeout=5)


def lost_entry(server: MemcachedProcess) -> None:
    app = Flask("bench-lost")
    swr = SWR()
    swr.init_app(app, parse_settings({"cache": {"servers": [server.address],
                                                "key_prefix": "blost", "l1_ttl": 0.2}},
                                     "<bench>"))
    st = state_of(app)
    jobs: dict[str, Job] = {}

    def origin(key: str) -> Callable[[], Any]:
        def fetch() -> str:
            gevent.sleep(3.0)
            return key
        return fetch

    for i in range(30):
        key = f"warm{i}"
        jobs[key] = Job(key, origin(key), Windows(max_age=600), source="bench")
    gevent.joinall([gevent.spawn(st.region.get_or_load, job) for job in jobs.values()])
    slowest = {"before": 0.0, "after": 0.0}
    phase = {"name": "before"}
    stop = gevent.event.Event()

    def reader(n: int) -> None:
        keys = list(jobs)
        i = n
        while not stop.is_set():
            job = jobs[keys[i % len(keys)]]
            i += 1
            t0 = time.perf_counter()
            try:
                st.region.get_or_load(job)
            except Exception:  # noqa: BLE001 - a failed read is counted as its time
                pass
            took = time.perf_counter() - t0
            slowest[phase["name"]] = max(slowest[phase["name"]], took)
            gevent.sleep(0.001)

    readers = [gevent.spawn(reader, n) for n in range(32)]
    gevent.sleep(1.0)
    phase["name"] = "after"
    server.restart()                                  # empty, same port
    gevent.sleep(4.0)                                 # longer than one origin fetch
    stop.set()
    gevent.joinall(readers)
    st.refresher.stop(timeout=10)
    print("30 warm keys of a 3 s origin, 32 readers, memcached restarted empty:")
    print(f"  slowest read before {slowest['before'] * 1000:7.1f} ms, "
          f"after the restart {slowest['after'] * 1000:7.1f} ms")


def main() -> None:
    binary = shutil.which("memcached")
    assert binary, "memcached is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        server = MemcachedProcess(binary, Path(tmp)).start()
        try:
            uncacheable(server.address)
            lost_entry(server)
        finally:
            server.kill()


if __name__ == "__main__":
    main()
