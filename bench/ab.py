"""A focused A/B of gunicorn configs on one route: interleaved rounds, medians.

Each named server (``stock``: stock ``gunicorn -k gevent``; ``shipped``: the shipped
config; any other name: a variant of ``bench.variants``) serves the hit bench's app; every
round runs wrk against each in turn (each round starting one server later), and the
workers' CPU per request is read from their schedstat (steadier than req/s on a shared
host). Prints the medians, and each server's CPU per request against the first one's::

    python -m bench.ab --rounds 7 --seconds 3 shipped "no access log" stock
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .procs import Gunicorn, Memcached, http_get
from .throughput import Wrk, write_settings, wrk
from .variants import AB_ONLY, VARIANTS, write_config


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    p.add_argument("servers", nargs="+",
                   choices=["stock", "shipped", *VARIANTS, *AB_ONLY])
    p.add_argument("--path", default="/raw")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", type=int, default=32)
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="swr-ab-"))
    memcached = Memcached(workdir)
    servers: dict[str, Gunicorn] = {}
    try:
        memcached.start()
        settings = workdir / "settings.toml"
        write_settings(settings, memcached)
        for i, name in enumerate(args.servers):
            sdir = workdir / f"server{i}"
            sdir.mkdir()
            if name == "stock":
                servers[name] = Gunicorn(sdir, settings, args.workers, {},
                                         app="bench.plain_app:app", stock=True)
            else:
                servers[name] = Gunicorn(sdir, settings, args.workers, {}, metrics=True,
                                         app="bench.hits_app:app",
                                         config=None if name == "shipped"
                                         else write_config(sdir, name))
            servers[name].start()
        time.sleep(0.5)
        for server in servers.values():
            for _ in range(4 * args.workers):
                http_get(server.url + args.path)
        print(f"A/B {args.path}: wrk {args.connections} connections, {args.rounds} rounds of "
              f"{args.seconds:g} s; load average {os.getloadavg()[0]:.2f}", flush=True)
        runs: dict[str, list[Wrk]] = {name: [] for name in servers}
        names = list(servers)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                runs[name].append(wrk(servers[name].url + args.path, args.connections,
                                      args.seconds, server=servers[name]))
            print(f"... round {r + 1}: " + ", ".join(
                f"{n} {runs[n][-1].cpu * 1e6:.0f} µs" for n in names), flush=True)
        for server in servers.values():
            server.check_alive()
    finally:
        for server in servers.values():
            server.stop(timeout=15.0)
        memcached.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    first = statistics.median(w.cpu for w in runs[names[0]])
    for name in names:
        cpu = statistics.median(w.cpu for w in runs[name])
        print(f"{name:30} {cpu * 1e6:6.1f} µs CPU/request ({cpu / first:.3f}x {names[0]}), "
              f"{statistics.median(w.rps for w in runs[name]):8,.0f} req/s, "
              f"p99 {statistics.median(w.p99 for w in runs[name]) * 1000:6.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
