"""nginx in front: ``python -m bench.nginx`` (part of ``make bench``).

One gunicorn (``deploy/gunicorn.conf.py``, ``bench.hits_app``), its own memcached, and two
nginx instances started from ``deploy/nginx.conf`` (the test bed's substitution of the
listen and upstream lines, ``tests/servers/nginx.py``): the file as shipped, and the same
with ``proxy_cache off`` (a plain reverse proxy). In one run, so every ratio compares
numbers measured minutes apart on the same machine, against the baseline a user would
otherwise run, clients straight to gunicorn:

1. ``/v1/const`` at 32 and 1,000 connections (wrk, ``--timeout 5s``), interleaved rounds,
   medians: straight to gunicorn, a hit in nginx's cache, passed by nginx to gunicorn;
2. slow clients: ``--slow`` connections (default 4,000) sending a request head a byte a
   second (reconnecting when closed), from a process of their own with its file limit
   raised; meanwhile "honest" clients (wrk, 4 connections, a new connection per request)
   ask ``/v1/const`` for ``--honest-seconds``. Their answers against the same clients'
   unloaded answers, straight to gunicorn and through both nginx instances.

``--quick`` shortens everything for a smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.servers.nginx import NGINX_CONFIG, NginxProcess, nginx_binary

from .procs import LOOPBACK, REPO_ROOT, Gunicorn, Memcached, http_get
from .throughput import Wrk, write_settings, wrk

PATH = "/v1/const"


def raise_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def slowloris(host: str, port: int, connections: int) -> None:
    """Hold ``connections`` connections to ``host:port``, each sending a request head a
    byte a second and opening again when the server closes it; print ``connected N``
    once they are all open (or tried), then run until terminated."""
    from gevent import monkey
    monkey.patch_all()
    import socket

    import gevent
    raise_file_limit()
    opened = 0

    def one() -> None:
        nonlocal opened
        counted = False
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=10)
            except OSError:
                if not counted:
                    counted, opened = True, opened + 1
                gevent.sleep(1.0)
                continue
            if not counted:
                counted, opened = True, opened + 1
            try:
                sock.sendall(f"GET {PATH} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode())
                while True:
                    gevent.sleep(1.0)
                    sock.sendall(b"x")
            except OSError:
                pass
            finally:
                sock.close()

    greenlets = [gevent.spawn(one) for _ in range(connections)]
    while opened < connections:
        gevent.sleep(0.1)
    print(f"connected {connections}", flush=True)
    gevent.joinall(greenlets)


class Slowloris:
    """:func:`slowloris` in a child process (``python -m bench.nginx --slowloris``)."""

    def __init__(self, port: int, connections: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.nginx", "--slowloris", str(port), str(connections)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
            start_new_session=True)

    def wait_connected(self) -> None:
        """Bounded: each connection is tried within its 10 s connect timeout, then the
        child says so (or exits, and the line is empty)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(b"connected"):
            raise RuntimeError(f"slowloris did not connect: {line!r}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def honest(url: str, seconds: float) -> Wrk:
    """4 clients, a new connection per request (as browsers behind NAT, or a retry)."""
    out = subprocess.run(
        ["wrk", "-t1", "-c4", f"-d{seconds:g}s", "--timeout=5s", "-H", "Connection: close",
         url], capture_output=True, text=True, check=True).stdout
    done = re.search(r"(\d+) requests in", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    return Wrk(float(done.group(1)) / seconds if done else 0.0, float("nan"),
               int(socket.group(4)) if socket else 0,
               sum(int(g) for g in socket.groups()[:3]) if socket else 0,
               int(done.group(1)) if done else 0)


def passing_template(workdir: Path) -> Path:
    """deploy/nginx.conf with its cache turned off: nginx as a plain reverse proxy."""
    text = NGINX_CONFIG.read_text()
    if "proxy_cache swr_cache;" not in text:
        raise RuntimeError("deploy/nginx.conf has no 'proxy_cache swr_cache;' line")
    path = workdir / "nginx-pass.conf"
    path.write_text(text.replace("proxy_cache swr_cache;", "proxy_cache off;"))
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.nginx", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0, help="per wrk run")
    p.add_argument("--slow", type=int, default=4000, help="slow connections")
    p.add_argument("--honest-seconds", type=float, default=12.0)
    p.add_argument("--slowloris", nargs=2, type=int, metavar=("PORT", "N"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.slow, args.honest_seconds = 1, 2.0, 500, 4.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.slowloris:
        slowloris(LOOPBACK, *args.slowloris)
        return 0
    missing = [name for name, found in (("wrk", shutil.which("wrk")),
                                        ("nginx", nginx_binary())) if found is None]
    if missing:
        print(f"{' and '.join(missing)} not installed (sudo apt-get install "
              f"{' '.join(missing)})", file=sys.stderr)
        return 2
    limit = raise_file_limit()
    binary = nginx_binary()
    assert binary is not None
    workdir = Path(tempfile.mkdtemp(prefix="swr-nginx-"))
    memcached = Memcached(workdir)
    server: Gunicorn | None = None
    fronts: list[NginxProcess] = []
    try:
        memcached.start()
        settings = workdir / "settings.toml"
        write_settings(settings, memcached)
        server = Gunicorn(workdir, settings, args.workers, {}, app="bench.hits_app:app")
        server.start()
        upstream = f"{LOOPBACK}:{server.port}"
        cached = NginxProcess(binary, workdir / "nginx-cache", upstream)
        fronts.append(cached.start())
        passing = NginxProcess(binary, workdir / "nginx-pass", upstream,
                               template=passing_template(workdir))
        fronts.append(passing.start())
        targets = {"straight to gunicorn": server.url, "nginx cache hit": cached.url,
                   "passed by nginx": passing.url}
        for url in targets.values():
            for _ in range(4 * args.workers):
                http_get(url + PATH)
        print(f"nginx bench: {args.workers} gunicorn gevent workers, nginx "
              f"{len(cached.worker_pids())} processes, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.2f}, open-file limit {limit}", flush=True)
        runs: dict[tuple[str, int], list[Wrk]] = {}
        for r in range(args.rounds):
            for connections in (32, 1000):
                order = list(targets)[r % 3:] + list(targets)[:r % 3]
                for name in order:
                    runs.setdefault((name, connections), []).append(
                        wrk(targets[name] + PATH, connections, args.seconds))
            print(f"... round {r + 1}: " + ", ".join(
                f"{n} @{c} {v[-1].rps:,.0f}/s" for (n, c), v in runs.items()), flush=True)
        slow: dict[str, tuple[Wrk, Wrk]] = {}
        for name, url in targets.items():
            alone = honest(url + PATH, args.honest_seconds)
            port = int(url.rsplit(":", 1)[1])
            attack = Slowloris(port, args.slow)
            try:
                attack.wait_connected()
                loaded = honest(url + PATH, args.honest_seconds)
            finally:
                attack.stop()
            slow[name] = (alone, loaded)
            print(f"... slow clients, {name}: {alone.requests} answers alone, "
                  f"{loaded.requests} beside {args.slow} slow connections", flush=True)
            server.check_alive()
    finally:
        for front in fronts:
            if front.proc is not None:
                front.stop()
        if server is not None:
            server.stop(timeout=15.0)
        memcached.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{PATH}, wrk --timeout 5s, medians of {args.rounds} interleaved round(s) of "
          f"{args.seconds:g} s:")
    print(f"{'':26}{'conns':>6}{'req/s':>10}{'x direct':>10}{'p99 ms':>9}{'timeouts':>9}"
          f"{'errors':>8}")
    for connections in (32, 1000):
        base = statistics.median(w.rps for w in runs["straight to gunicorn", connections])
        for name in targets:
            got = runs[name, connections]
            rps = statistics.median(w.rps for w in got)
            print(f"{name:26}{connections:>6}{rps:>10,.0f}{rps / base:>10.2f}"
                  f"{statistics.median(w.p99 for w in got) * 1000:>9.1f}"
                  f"{sum(w.timeouts for w in got):>9}{sum(w.errors for w in got):>8}")
    print(f"\nhonest clients (4, a connection per request) for {args.honest_seconds:g} s, "
          f"alone and beside {args.slow} slow connections (a byte a second):")
    for name, (alone, loaded) in slow.items():
        share = loaded.requests / alone.requests if alone.requests else 0.0
        verdict = "within 2x" if share >= 0.5 else "NOT within 2x"
        print(f"  {name:26}{alone.requests:>7} alone{loaded.requests:>7} loaded  "
              f"{share:.2f} of unloaded ({verdict}); timeouts {loaded.timeouts}, "
              f"errors {loaded.errors}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
