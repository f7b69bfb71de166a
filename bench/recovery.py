"""Recovery figures for docs/RELIABILITY.md: how long after memcached comes back does the
service use it again? ``python -m bench.recovery`` (part of ``make bench``).

In one process monkey-patched like a gunicorn gevent worker, the service's app answers
``POST /v1/counters/NAME`` from 32 greenlets in a loop (each counter needs memcached). For
each pool size, every pooled connection is warmed first, then memcached is

* restarted (killed, started again empty on the same port), or
* frozen with SIGSTOP for 10 s, then thawed with SIGCONT;

and the figure is the time from memcached answering again to the first counter answered
200, with the number of 503s in between. Timing lives here, not in the test suite.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

from service import create_app  # noqa: E402
from service.config import parse_settings  # noqa: E402
from service.flask.state import state_of  # noqa: E402
from tests.servers import MemcachedProcess  # noqa: E402


def measure(kind: str, pool_size: int, workdir: Path) -> tuple[float, int]:
    binary = shutil.which("memcached")
    assert binary, "memcached is not installed"
    server = MemcachedProcess(binary, workdir).start()
    app = create_app(parse_settings({"cache": {
        "servers": [server.address], "pool_size": pool_size, "key_prefix": f"rec{pool_size}",
    }}, "<bench>"))
    client = app.test_client()
    statuses: list[tuple[float, int]] = []
    stop = [False]

    def load(i: int) -> None:
        local = app.test_client()
        while not stop[0]:
            statuses.append((time.monotonic(), local.post(f"/v1/counters/c{i}").status_code))
            gevent.sleep(0.005)

    try:
        pool = state_of(app).pool
        warm = [pool.acquire() for _ in range(pool_size)]
        for conn in warm:
            conn.call(server.address, "version", lambda c: c.version())
        for conn in warm:
            pool.release(conn)
        assert client.post("/v1/counters/warm").status_code == 200
        workers = [gevent.spawn(load, i) for i in range(32)]
        gevent.sleep(0.5)
        if kind == "restart":
            server.restart()
        else:
            server.freeze()
            gevent.sleep(10)
            server.thaw()
        back = time.monotonic()
        deadline = back + 30
        while time.monotonic() < deadline:
            if any(t >= back and s == 200 for t, s in statuses):
                break
            gevent.sleep(0.01)
        stop[0] = True
        gevent.joinall(workers, timeout=5)
        first_ok = min((t for t, s in statuses if t >= back and s == 200), default=None)
        failed = sum(1 for t, s in statuses if t >= back and s != 200)
        return (first_ok - back if first_ok is not None else float("inf")), failed
    finally:
        stop[0] = True
        state_of(app).pool.close()
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__)
    parser.add_argument("--pool-sizes", default="4,16,64")
    args = parser.parse_args(argv)
    print("| fault | pool_size | back in use after | 503s after memcached answered |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="swr-recovery-") as tmp:
        for kind in ("restart", "freeze 10 s"):
            for size in (int(s) for s in args.pool_sizes.split(",")):
                seconds, failed = measure(kind.split()[0], size, Path(tmp))
                print(f"| {kind} | {size} | {seconds * 1000:,.0f} ms | {failed} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
