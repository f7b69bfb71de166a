"""What each piece of ours adds to one request, in-process, in µs: the numbers the hit
bench's ratios cannot show on a shared machine.

wrk's rounds on a shared 2-core host move by 10% and more between two runs of the same
server, more than most of what our config adds. So ``make bench`` also times each piece
alone, in a gevent-patched process of its own, interleaved rounds, medians:

* ``hook``: the shipped ``post_request`` when the connection does not wait (most answers);
* ``turn``: one fair turn (``next_turn``) among 16 greenlets each taking turns, the loop
  iteration it costs shared among them; paid at most once per answer, and under
  saturation by nearly every answer;
* ``line``: one access line in the run's JSON format (``bench.accessline``);
* ``headers v1`` / ``headers swr``: gunicorn's own work (``Response.start_response``,
  ``write``, ``close``) on a ``/v1`` hit's and an ``@swr.cached`` hit's headers, beyond
  the raw app's two;
* ``fast v1`` / ``fast swr``: the hit itself, the service's WSGI app called with the
  request's environ, beyond the raw callable in front of it;
* ``extension``: an uncached Flask view of the service's app (the fast path's routing
  check, the extension's teardowns, its larger URL map) beyond the same view in a plain
  Flask app.

``bench.throughput`` adds them up against stock raw's CPU per request measured in its
run: what each of the issue's ratios would be if nothing but our own per-request work
counted. Standalone::

    python -m bench.pieces [--rounds 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

GREENLETS = 16


def _per_call(fn: Callable[[], Any], n: int, repeats: int = 3) -> float:
    """Seconds per call of ``fn``: the best of ``repeats`` runs of ``n // repeats`` calls
    (the host's noise only ever adds)."""
    best = float("inf")
    each = max(1, n // repeats)
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(each):
            fn()
        best = min(best, (time.perf_counter() - began) / each)
    return best


def hook(n: int = 50000) -> float:
    """The shipped ``post_request`` on an answer in a later loop iteration (no wait)."""
    from types import SimpleNamespace

    from service.gunicorn import conf, worker

    req = SimpleNamespace(unreader=SimpleNamespace())
    resp = SimpleNamespace(should_close=lambda: False)
    earlier = (-5, 0, 0.0)   # the last answer in an iteration long past
    attr = worker._LAST_ANSWER

    def call() -> None:
        conf.post_request(None, req, None, resp)
        setattr(req.unreader, attr, earlier)   # the next answer: a later iteration again

    def bare() -> None:
        setattr(req.unreader, attr, earlier)

    return _per_call(call, n) - _per_call(bare, n)


def turn(n: int = 5000) -> float:
    """One fair turn, each of :data:`GREENLETS` greenlets taking ``n`` in a row."""
    import gevent

    from service.gunicorn.worker import next_turn

    def taker() -> None:
        for _ in range(n):
            next_turn()

    began = time.process_time()
    gevent.joinall([gevent.spawn(taker) for _ in range(GREENLETS)])
    return (time.process_time() - began) / (GREENLETS * n)


def gunicorn_headers(headers: list[tuple[str, str]], body: bytes, n: int = 20000) -> float:
    """gunicorn's own work on an answer with ``headers``: status line, header checks,
    default headers, the two writes (to a socket that takes everything)."""
    from types import SimpleNamespace

    from gunicorn.config import Config
    from gunicorn.http.wsgi import Response

    cfg = Config()
    sock = SimpleNamespace(sendall=lambda data: None)
    req = SimpleNamespace(version=(1, 1), method="GET", headers=[], path="/",
                          should_close=lambda: False)

    def answer() -> None:
        resp = Response(req, sock, cfg)
        resp.start_response("200 OK", headers)
        resp.write(body)
        resp.close()

    return _per_call(answer, n)


class _Apps:
    """The hit bench's two apps in this process, and the answers they give."""

    def __init__(self) -> None:
        from werkzeug.test import EnvironBuilder

        import bench.hits_app as hits
        import bench.plain_app as plain

        self.hits, self.plain = hits.app, plain.app
        self.environ = {p: EnvironBuilder(path=p).get_environ()
                        for p in ("/raw", "/v1/const", "/swr", "/flask")}
        self.headers: dict[str, list[tuple[str, str]]] = {}
        self.body: dict[str, bytes] = {}
        for path in self.environ:
            for _ in range(3):   # fill the key; the fast path memoizes after the first
                self.headers[path], self.body[path] = self.call(self.hits, path)
        assert ("X-Cache", "HIT") in self.headers["/v1/const"], self.headers["/v1/const"]
        assert ("X-Cache", "HIT") in self.headers["/swr"], self.headers["/swr"]

    def call(self, app: Any, path: str) -> tuple[list[tuple[str, str]], bytes]:
        seen: list[list[tuple[str, str]]] = []

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            seen.append(headers)

        body = b"".join(app(dict(self.environ[path]), start_response))
        return seen[0], body

    def per_call(self, app: Any, path: str, n: int) -> float:
        environ = self.environ[path]

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            pass

        return _per_call(lambda: b"".join(app(dict(environ), start_response)), n)


def measure(rounds: int = 7) -> dict[str, list[float]]:
    """Each piece's seconds per request, one value per round (interleaved)."""
    from .accessline import per_line

    apps = _Apps()
    raw_headers = apps.headers["/raw"]
    seen: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        seen.setdefault(name, []).append(max(0.0, value))

    for _ in range(rounds):
        add("hook", hook())
        add("turn", turn())
        add("line", per_line("json"))
        base = gunicorn_headers(raw_headers, apps.body["/raw"])
        add("headers v1", gunicorn_headers(apps.headers["/v1/const"],
                                           apps.body["/v1/const"]) - base)
        add("headers swr", gunicorn_headers(apps.headers["/swr"], apps.body["/swr"]) - base)
        raw = apps.per_call(apps.hits, "/raw", 20000)
        add("fast v1", apps.per_call(apps.hits, "/v1/const", 20000) - raw)
        add("fast swr", apps.per_call(apps.hits, "/swr", 20000) - raw)
        add("extension", apps.per_call(apps.hits, "/flask", 15000)
            - apps.per_call(apps.plain, "/flask", 15000))
    return seen


def medians(seen: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in seen.items()}


#: What each of the issue's ratios adds up, from the pieces (the keys of :func:`measure`).
SUMS: dict[str, tuple[str, ...]] = {
    "raw app, our config": ("hook", "turn", "line"),
    "`/v1` hit": ("hook", "turn", "line", "headers v1", "fast v1"),
    "`@swr.cached` hit": ("hook", "turn", "line", "headers swr", "fast swr"),
    "bare Flask view, our hooks": ("hook", "turn", "line", "extension"),
}


def implied(pieces: dict[str, float], stock_raw: float, stock_flask: float
            ) -> list[tuple[str, float, float]]:
    """(row, our µs added, the ratio it implies): stock's CPU per request over stock's
    plus ours; the Flask row against stock's bare Flask view, the others against stock
    raw."""
    out = []
    for row, parts in SUMS.items():
        added = sum(pieces[p] for p in parts)
        base = stock_flask if "Flask view" in row else stock_raw
        out.append((row, added, base / (base + added)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pieces", description=__doc__)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", action="store_true", help="print the rounds as JSON")
    args = p.parse_args(argv)
    from gevent import monkey

    monkey.patch_all()   # as in a gunicorn worker: post_request only waits when patched
    if "SERVICE_SETTINGS" not in os.environ:
        print("SERVICE_SETTINGS must name a settings file whose [sources.const] is "
              "bench.hits_app:const, and BENCH_MEMCACHED a memcached (bench.throughput "
              "sets both)", file=sys.stderr)
        return 2
    seen = measure(args.rounds)
    if args.json:
        print(json.dumps(seen))
        return 0
    for name, value in medians(seen).items():
        print(f"{name:12} {value * 1e6:5.2f} µs  (rounds "
              f"{', '.join(f'{v * 1e6:.2f}' for v in seen[name])})")
    return 0


def run(memcached_address: str, settings: Path, rounds: int) -> dict[str, list[float]]:
    """:func:`measure` in a process of its own (gevent's patch, as in a worker)."""
    env = dict(os.environ, SERVICE_SETTINGS=str(settings),
               BENCH_MEMCACHED=memcached_address,
               PROMETHEUS_MULTIPROC_DIR=tempfile.mkdtemp(prefix="swr-pieces-"))
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "bench.pieces", "--rounds", str(rounds),
                          "--json"], env=env, cwd=root, capture_output=True, text=True,
                         check=True, timeout=600).stdout
    shutil.rmtree(env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    return dict(json.loads(out.strip().splitlines()[-1]))


if __name__ == "__main__":
    sys.exit(main())
