"""Counter figures for docs/RELIABILITY.md: is every number handed out once, under faults?
``python -m bench.counters``.

In one process monkey-patched like a gunicorn gevent worker, 32 greenlets post to
``/v1/counters/NAME`` in a loop against three memcached servers, while the counter's own
server is

* frozen with SIGSTOP for 3 s, then thawed;
* restarted (stopped, started again empty on the same port);
* alone behind a proxy that holds 5% of the requests back 200-600 ms (what a lost
  segment costs a TCP reader: one or two retransmissions), with the shared 0.25 s
  timeout.

Each row counts the requests, the numbers handed out twice, the callers that saw a
number go backwards, and the 503s. The baseline for the lossy row is the same run with
the counter's timeout set back to the shared one (what the service did before).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.server  # noqa: E402

from service import create_app  # noqa: E402
from service.config import parse_settings  # noqa: E402
from service.flask.state import state_of  # noqa: E402
from service.http import counters  # noqa: E402
from tests.servers import MemcachedProcess  # noqa: E402

CALLERS = 32


class LossyProxy:
    """Forwards to memcached, holding a share of the requests back 200-600 ms."""

    def __init__(self, target: str, share: float) -> None:
        host, port = target.rsplit(":", 1)
        self.target, self.share = (host, int(port)), share
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.pumps: list[gevent.Greenlet] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_port}"

    def _handle(self, down: socket.socket, _: Any) -> None:
        up = socket.create_connection(self.target, timeout=5)
        self.pumps.append(gevent.spawn(self._pump, up, down, False))
        self._pump(down, up, True)

    def _pump(self, source: socket.socket, sink: socket.socket, lossy: bool) -> None:
        try:
            while data := source.recv(65536):
                if lossy and random.random() < self.share:
                    gevent.sleep(random.uniform(0.2, 0.6))
                sink.sendall(data)
        except OSError:
            pass
        finally:
            source.close()
            sink.close()

    def stop(self) -> None:
        self.server.stop(timeout=1)
        gevent.killall(self.pumps)


def run(servers: list[str], fault: Callable[[str], None], seconds_after: float,
        timeout: float = 0.25) -> dict[str, int]:
    """Callers bump one counter; ``fault`` is applied to its server (by address)."""
    app = create_app(parse_settings({"cache": {
        "servers": servers, "pool_size": 64, "timeout": timeout, "connect_timeout": timeout,
        "key_prefix": f"bc{random.randrange(10**9)}",
    }}, "<bench>"))
    log: list[tuple[int, int, int | None]] = []
    stop = [False]

    def caller(i: int) -> None:
        client = app.test_client()
        while not stop[0]:
            answer = client.post("/v1/counters/tickets")
            ok = answer.status_code == 200
            log.append((i, answer.status_code, answer.get_json()["value"] if ok else None))
            gevent.sleep(0.005 if ok else 0.02)

    st = state_of(app)
    home = st.pool.server_for(st.store.child("counter").key("tickets"))
    try:
        callers = [gevent.spawn(caller, i) for i in range(CALLERS)]
        gevent.sleep(1.0)
        fault(home)
        gevent.sleep(seconds_after)
        stop[0] = True
        gevent.joinall(callers, timeout=30)
    finally:
        stop[0] = True
        state_of(app).pool.close()
    values = [v for _, _, v in log if v is not None]
    last: dict[int, int] = {}
    backwards = 0
    for i, _, v in log:
        if v is not None:
            backwards += v <= last.get(i, -1)
            last[i] = max(v, last.get(i, -1))
    return {"requests": len(log), "duplicates": len(values) - len(set(values)),
            "backwards": backwards, "503": sum(1 for _, s, _ in log if s == 503),
            "other": sum(1 for _, s, _ in log if s not in (200, 503))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.counters", description=__doc__)
    parser.parse_args(argv)
    binary = shutil.which("memcached")
    assert binary, "memcached is not installed"
    print("| fault | requests | numbers handed out twice | went backwards | 503 | other |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="swr-counters-") as tmp:
        procs = [MemcachedProcess(binary, Path(tmp)).start() for _ in range(3)]
        try:
            by_address = {p.address: p for p in procs}
            addresses = list(by_address)

            def freeze(home: str) -> None:
                by_address[home].freeze()
                gevent.sleep(3)
                by_address[home].thaw()

            def restart(home: str) -> None:
                by_address[home].restart()

            rows: list[tuple[str, Callable[[], dict[str, int]]]] = [
                ("counter's server (1 of 3) frozen 3 s", lambda: run(addresses, freeze, 2)),
                ("counter's server restarted", lambda: run(addresses, restart, 4)),
            ]
            for name, measure in rows:
                r = measure()
                print(f"| {name} | {r['requests']:,} | {r['duplicates']} | {r['backwards']}"
                      f" | {r['503']:,} | {r['other']} |", flush=True)
            for label, patient in (("the shared 0.25 s timeout (before)", False),
                                   ("the counter's 1 s timeout", True)):
                proxy = LossyProxy(addresses[0], 0.05)
                saved = counters.TIMEOUT
                counters.TIMEOUT = saved if patient else 0.25   # type: ignore[misc]
                try:
                    r = run([proxy.address], lambda _: None, 5)   # one server, lossy
                finally:
                    counters.TIMEOUT = saved                    # type: ignore[misc]
                    proxy.stop()
                print(f"| 5% of requests held 200-600 ms, {label} | {r['requests']:,} | "
                      f"{r['duplicates']} | {r['backwards']} | {r['503']:,} | {r['other']} |",
                      flush=True)
        finally:
            for p in procs:
                p.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
