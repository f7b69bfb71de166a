"""The drop-in bench: an unchanged Flask-Caching app, only its configuration switched.

``python -m bench.dropin`` (also part of ``make bench``). One run, the same load on the same
app (``tests/flask_caching_app.py``: ``@cache.cached()`` over a view that asks a slow
origin), under gunicorn with 4 gevent workers, three configurations:

* ``plain``: Flask-Caching's own ``MemcachedCache`` (python-memcached), as users run it;
* ``switched``: ``CACHE_TYPE = "service.backend.MemcachedCache"``, nothing else changed;
* ``switched + SWR``: the same plus ``CACHE_STALE_WHILE_REVALIDATE``.

It reports, per configuration, how many times the origin was asked (recomputes) over how
many windows, and the slowest read after the first fill, with ratios against ``plain``
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import load
from bench.procs import LOOPBACK, Gunicorn, Memcached, http_get
from tests.servers import OriginServer

CONFIGS = {
    "plain": {"FLASK_CACHE_TYPE": "MemcachedCache"},
    "switched": {"FLASK_CACHE_TYPE": "service.backend.MemcachedCache"},
    "switched + SWR": {"FLASK_CACHE_TYPE": "service.backend.MemcachedCache",
                       "FLASK_CACHE_STALE_WHILE_REVALIDATE": "60"},
}


@dataclass
class Row:
    name: str
    recomputes: int
    windows: float
    slowest: float
    requests: int
    errors: int


def run_one(name: str, extra: dict[str, str], args: argparse.Namespace, workdir: Path,
            memcached: Memcached, origin: OriginServer) -> Row:
    env = {
        "FLASK_CACHE_MEMCACHED_SERVERS": json.dumps([memcached.address]),
        "FLASK_CACHE_KEY_PREFIX": json.dumps(f"bench-{len(name)}-{name[:6]}".replace(" ", "")),
        "FLASK_CACHE_DEFAULT_TIMEOUT": str(args.ttl),
        "ORIGIN_URL": origin.url, "ORIGIN_DELAY": str(args.view_seconds), **extra,
    }
    (workdir / name.replace(" ", "_")).mkdir()
    server = Gunicorn(workdir / name.replace(" ", "_"), workdir / "none.toml", args.workers,
                      env, app="tests.flask_caching_app:app").start()
    try:
        status, _ = http_get(server.url + "/report", timeout=args.view_seconds + 10)
        assert status == 200, f"{name}: warm-up answered {status}"
        before = origin.count("/report")
        result = load.run(LOOPBACK, server.port, "/report", args.connections, args.duration,
                          timeout=args.view_seconds * 4)
        recomputes = origin.count("/report") - before
    finally:
        server.stop()
    samples = result.samples
    return Row(name, recomputes, result.wall / args.ttl,
               max((s.latency for s in samples), default=0.0), len(samples),
               sum(1 for s in samples if s.status != 200))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dropin", description=__doc__)
    parser.add_argument("--duration", type=float, default=14.0)
    parser.add_argument("--view-seconds", type=float, default=3.0)
    parser.add_argument("--ttl", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="swr-dropin-") as tmp:
        workdir = Path(tmp)
        (workdir / "none.toml").write_text("")
        memcached = Memcached(workdir).start()
        origin = OriginServer(workdir).start()
        try:
            for name, extra in CONFIGS.items():
                rows.append(run_one(name, extra, args, workdir, memcached, origin))
        finally:
            origin.stop()
            memcached.stop()
    print(f"\nUnchanged Flask-Caching app, {args.workers} gevent workers, "
          f"{args.connections} clients for {args.duration:g}s, a {args.view_seconds:g}s "
          f"origin, timeout {args.ttl}s\n")
    print("| configuration | recomputes | per window | slowest read | × plain | errors |")
    print("|---|---|---|---|---|---|")
    plain = rows[0]
    for row in rows:
        print(f"| {row.name} | {row.recomputes} | {row.recomputes / row.windows:.2f} | "
              f"{row.slowest * 1000:,.0f} ms | {row.slowest / plain.slowest:.2f} | "
              f"{row.errors} of {row.requests} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
