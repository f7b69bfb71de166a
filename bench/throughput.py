"""The hit bench: ``python -m bench.throughput`` (part of ``make bench``).

The ceiling is stock gunicorn: a raw WSGI app answering constant bytes under
``gunicorn -k gevent`` with every setting its default (no access log), beside the same
app under the shipped ``deploy/gunicorn.conf.py``. Every other row is a ratio of that
stock raw row, measured minutes apart on the same machine in the same run:

1. at 32 connections (wrk, ``--rounds`` interleaved rounds, each starting one row later,
   medians): stock gunicorn serving ``bench.plain_app`` (raw WSGI, a bare Flask view,
   Flask-Caching's ``@cached`` hit); the shipped config serving ``bench.hits_app`` (raw
   WSGI, the bare Flask view with our Flask extension, ``/v1`` and ``@swr.cached`` hits);
   and the shipped config with one thing taken out (``bench/variants.py``): the fair turn,
   the access log, our accept path (gunicorn's own, with and without ``reuse_port``);
2. at 1,000 connections (wrk ``--timeout 5s``, the paths' order alternating): stock raw
   WSGI, and raw WSGI and ``/v1`` on the shipped config and on the accept variants:
   requests/s, p99, timeouts; and how many of 1,000 keep-alive connections that each ask
   once get no answer at all within 5 s (wrk never counts those);
3. a cold key read by 300 simultaneous readers (origin 1 s): how many origin fetches, how
   long the readers waited, the slowest of them;
4. the herd: one hot ``/v1`` key, a 3 s origin, 4 s windows (``stale_while_revalidate``
   60 s), 32 closed-loop connections: origin fetches per window, and the slowest read
   that overlapped a refresh against the p99 of the hot reads that did not
   (``bench/refreshes.py``), then its two controls (``bench/noise.py``): the same load on
   the raw WSGI app, and a lone busy loop that shows how long the machine takes the CPU
   away from a process with nothing to wait for.

It prints the table, the ratios and the targets, writes ``docs/BENCHMARKS.md`` (with
``bench/memory.py``'s RSS figures, a PNG plot and the profile of a hot hit from
``bench/profile_hit.py``) and rewrites the README's performance table, between
``<!-- bench:table -->`` and ``<!-- /bench:table -->``, from the same numbers.
``--quick`` shortens everything for a smoke run (and writes neither document).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent

from . import load as loadgen
from . import noise, pieces
from .procs import LOOPBACK, REPO_ROOT, Gunicorn, Memcached, child_pids, http_get
from .refreshes import HERD_MAX_AGE, HERD_ORIGIN_SECONDS, herd, herd_line
from .variants import VARIANTS, write_config


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    server: str     # "stock", "shipped" or a name of bench.variants.VARIANTS
    path: str


STOCK_RAW = "stock raw"
ROWS = [
    Row(STOCK_RAW, "raw WSGI app, stock `gunicorn -k gevent` (no access log)", "stock", "/raw"),
    Row("raw", "raw WSGI app, our config (access log to a file)", "shipped", "/raw"),
    Row("raw, no fair turn", "raw WSGI app, our config without the fair turn",
        "no fair turn", "/raw"),
    Row("raw, no access log", "raw WSGI app, our config without an access log",
        "no access log", "/raw"),
    Row("raw, no acceptor", "raw WSGI app, our config with gunicorn's own accept",
        "no acceptor", "/raw"),
    Row("raw, reuse_port", "raw WSGI app, our config with gunicorn's own accept and "
        "`reuse_port`", "reuse_port", "/raw"),
    Row("flask stock", "bare Flask view, stock gunicorn", "stock", "/flask"),
    Row("flask", "bare Flask view, our config and Flask extension", "shipped", "/flask"),
    Row("flask, no access log", "bare Flask view, our config and Flask extension, "
        "no access log", "no access log", "/flask"),
    Row("fc", "Flask-Caching `@cached` hit (python-memcached), stock gunicorn", "stock",
        "/fc"),
    Row("v1", "`/v1/NAME` hit, our config", "shipped", "/v1/const"),
    Row("swr", "`@swr.cached` hit on a Flask view, our config", "shipped", "/swr"),
]
#: (server, path) of the 1,000-connection rows.
HIGH = [("stock", "/raw"), ("shipped", "/raw"), ("shipped", "/v1/const"),
        ("no acceptor", "/raw"), ("no acceptor", "/v1/const"),
        ("reuse_port", "/raw"), ("reuse_port", "/v1/const"),
        ("reuse_port, 250", "/raw"), ("reuse_port, 250", "/v1/const")]
#: The servers the unanswered-connections probe runs against (after the 1,000 rows).
PROBED = ["stock", "shipped", "no acceptor", "reuse_port", "reuse_port, 250"]
README_BLOCK = ("<!-- bench:table -->", "<!-- /bench:table -->")


@dataclass
class Wrk:
    rps: float
    p99: float          # seconds
    timeouts: int
    errors: int
    requests: int
    cpu: float = float("nan")   # the server's workers' CPU seconds per request


def workers_cpu(server: Gunicorn) -> float:
    """CPU seconds the server's workers (every thread of each) have run so far, from
    ``/proc/PID/task/TID/schedstat`` (nanoseconds)."""
    assert server.proc is not None
    total = 0
    for pid in child_pids(server.proc.pid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError), \
                        open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                    total += int(f.read().split()[0])
    return total / 1e9


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def wrk(url: str, connections: int, seconds: float, timeout: float = 5.0,
        server: Gunicorn | None = None) -> Wrk:
    """wrk's numbers, and with ``server`` its workers' CPU per request meanwhile."""
    cpu_before = workers_cpu(server) if server is not None else 0.0
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", f"--timeout={timeout:g}s",
         "--latency", url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    done = re.search(r"(\d+) requests in", out)
    errors = sum(int(g) for g in socket.groups()[:3]) if socket else 0
    requests = int(done.group(1)) if done else 0
    cpu = float("nan")
    if server is not None and requests:
        cpu = (workers_cpu(server) - cpu_before) / requests
    return Wrk(rps, _seconds(p99.group(1)) if p99 else float("nan"),
               int(socket.group(4)) if socket else 0,
               errors + (int(non2xx.group(1)) if non2xx else 0), requests, cpu)


def write_settings(path: Path, memcached: Memcached) -> None:
    path.write_text(
        "# Written by python -m bench.throughput.\n"
        "[cache]\n"
        f'servers = ["{memcached.address}"]\n'
        'key_prefix = "hits"\n'
        "pool_size = 64\n"
        "[refresh]\nfetch_timeout = 10\n"
        '[sources.const]\nkind = "python"\ntarget = "bench.hits_app:const"\n'
        "max_age = 3600\n"
        '[sources.slow]\nkind = "python"\ntarget = "bench.hits_app:slow"\n'
        "max_age = 3600\n"
        '[sources.herd]\nkind = "python"\ntarget = "bench.hits_app:herd"\n'
        f"max_age = {HERD_MAX_AGE:g}\nstale_while_revalidate = 60\n", encoding="utf-8")


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def cold_key(server: Gunicorn, readers: int = 300) -> dict[str, object]:
    """``readers`` simultaneous GETs of one cold key; origin fetches from ``/metrics``."""
    path = f"/v1/slow?id=cold{time.time_ns()}"
    request = loadgen._Connection  # the bench's small HTTP client (one request each)
    before = metric(http_get(server.url + "/metrics")[1].decode(), "cache_refreshes_total",
                    source="slow", outcome="ok")
    results: list[tuple[float, int, str]] = []

    def reader() -> None:
        conn = request(LOOPBACK, server.port, (
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode(), 30.0)
        t0 = time.monotonic()
        try:
            status, x_cache = conn.get()
        except (OSError, ValueError):
            status, x_cache = 0, ""
        finally:
            conn.close()
        results.append((time.monotonic() - t0, status, x_cache))

    gevent.joinall([gevent.spawn(reader) for _ in range(readers)])
    time.sleep(1.5)  # every worker flushes its metrics within a second
    after = metric(http_get(server.url + "/metrics")[1].decode(), "cache_refreshes_total",
                   source="slow", outcome="ok")
    waits = sorted(r[0] for r in results)
    return {"readers": readers, "fetches": after - before,
            "ok": sum(1 for r in results if r[1] == 200),
            "x_cache": dict(Counter(r[2] for r in results)),
            "p50": waits[len(waits) // 2], "max": waits[-1]}


def unanswered(server: Gunicorn, connections: int, wait: float = 5.0) -> int:
    """How many of ``connections`` keep-alive connections, opened at once and each asking
    ``/raw`` once, get no answer within ``wait`` seconds. Every connection stays open
    until all are done, as wrk's would: a server that holds fewer connections than it is
    given leaves the others unaccepted, and wrk never counts a request with no answer."""
    request = f"GET /raw HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode()
    conns = [loadgen._Connection(LOOPBACK, server.port, request, wait + 5.0)
             for _ in range(connections)]
    answered = [0]

    def ask(conn: loadgen._Connection) -> None:
        try:
            with gevent.Timeout(wait):
                if conn.get()[0] == 200:
                    answered[0] += 1
        except (OSError, ValueError, gevent.Timeout):
            pass

    try:
        gevent.joinall([gevent.spawn(ask, c) for c in conns], timeout=wait + 10.0)
    finally:
        for conn in conns:
            conn.close()
    return connections - answered[0]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="short runs (a smoke test); writes no document")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="per row per round")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--high", type=int, default=1000, help="connections of the high rows")
    p.add_argument("--high-seconds", type=float, default=8.0)
    p.add_argument("--herd-seconds", type=float, default=20.0)
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--no-docs", action="store_true",
                   help="write neither docs/BENCHMARKS.md nor the README's table")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.high_seconds, args.herd_seconds = 1, 2.0, 4.0, 12.0
        args.no_docs = True
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (sudo apt-get install wrk)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="swr-hits-"))
    memcached = Memcached(workdir)
    servers: dict[str, Gunicorn] = {}
    began = time.monotonic()
    load_average = os.getloadavg()[0]
    try:
        memcached.start()
        settings = workdir / "settings.toml"
        write_settings(settings, memcached)
        herd_log = workdir / "herd.log"
        (workdir / "stock").mkdir()
        servers["stock"] = Gunicorn(workdir / "stock", settings, args.workers,
                                    {"BENCH_MEMCACHED": memcached.address},
                                    app="bench.plain_app:app", stock=True).start()
        servers["shipped"] = Gunicorn(workdir, settings, args.workers,
                                      {"BENCH_HERD_LOG": str(herd_log),
                                       "BENCH_HERD_SECONDS": f"{HERD_ORIGIN_SECONDS:g}"},
                                      metrics=True, app="bench.hits_app:app").start()
        for i, name in enumerate(VARIANTS):
            vdir = workdir / f"variant{i}"
            vdir.mkdir()
            servers[name] = Gunicorn(vdir, settings, args.workers, {}, metrics=True,
                                     app="bench.hits_app:app",
                                     config=write_config(vdir, name)).start()
        time.sleep(0.5)
        for row in ROWS:  # fill every cache, in every worker
            for _ in range(4 * args.workers):
                http_get(servers[row.server].url + row.path)
        for name, path in HIGH:
            http_get(servers[name].url + path)
        print(f"hit bench: {args.workers} gunicorn gevent workers per server, wrk "
              f"{args.connections} connections, {args.rounds} interleaved round(s) of "
              f"{args.seconds:g} s per row; {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        runs: dict[str, list[Wrk]] = {row.key: [] for row in ROWS}
        for r in range(args.rounds):
            # Each round starts one row later: a run right after another one on the same
            # server does a little worse (its connections still closing), and a fixed
            # order would always hand that to the same row.
            for row in ROWS[r % len(ROWS):] + ROWS[:r % len(ROWS)]:
                runs[row.key].append(wrk(servers[row.server].url + row.path,
                                         args.connections, args.seconds,
                                         server=servers[row.server]))
            print(f"... round {r + 1}: " + ", ".join(
                f"{row.key} {runs[row.key][-1].rps:,.0f}/s" for row in ROWS), flush=True)
        high: dict[tuple[str, str], list[Wrk]] = {key: [] for key in HIGH}
        # Two rounds, the second in the opposite order: a run right after another one's
        # 1,000 closing connections does worse, and no row always follows the same one.
        high_rounds = 1 if args.rounds == 1 else 2
        for r in range(high_rounds):
            for name, path in HIGH[::1 if r % 2 == 0 else -1]:
                high[name, path].append(wrk(servers[name].url + path, args.high,
                                            args.high_seconds, server=servers[name]))
            print(f"... {args.high} connections: " + ", ".join(
                f"{n} {p} p99 {h[-1].p99 * 1000:,.0f} ms" for (n, p), h in high.items()),
                flush=True)
        never = {}
        for name in PROBED:
            time.sleep(1.0)   # the previous load's connections closed
            never[name] = unanswered(servers[name], args.high)
        print(f"... {args.high} connections asking once, no answer in 5 s: "
              + ", ".join(f"{n} {v}" for n, v in never.items()), flush=True)
        server = servers["shipped"]
        for name in list(servers):
            if name != "shipped":
                servers[name].check_alive()
                servers.pop(name).stop(timeout=15.0)
        cold = cold_key(server)
        print(f"... herd: /v1/herd, {args.connections} connections for "
              f"{args.herd_seconds:g} s", flush=True)
        herded = herd(server, herd_log, args.connections, args.herd_seconds)
        # The controls the herd is read against (bench/noise.py): the same load on the raw
        # WSGI app, then, with every server stopped, a lone busy loop.
        print(f"... control: /raw, {args.connections} connections for "
              f"{args.herd_seconds:g} s", flush=True)
        herded["control"] = noise.control_tail(server.port, "/raw", args.connections,
                                               args.herd_seconds)
        server.check_alive()
        servers.pop("shipped").stop(timeout=15.0)
        print(f"... control: a lone busy loop for {args.herd_seconds / 2:g} s", flush=True)
        herded["stalls"] = noise.cpu_stalls(args.herd_seconds / 2)
        print("... profiling a hot /v1 hit in-process, fast path off and on", flush=True)
        from .profile_hit import profile_hits
        profile = profile_hits(memcached.address, n=5000 if args.quick else 20000)
        print("... timing each piece of ours alone, in-process (python -m bench.pieces)",
              flush=True)
        seen_pieces = pieces.run(memcached.address, settings, 3 if args.quick else 7)
    finally:
        for running in servers.values():
            running.stop(timeout=15.0)
        memcached.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    doc = summarise(runs, high, never, args)
    doc.update({"cold": cold, "herd": herded, "seconds": time.monotonic() - began,
                "load_average": load_average, "pieces": seen_pieces})
    print_report(doc, args)
    keys = "100000" if args.quick else "1000000"
    print(f"... RSS through {int(keys):,} distinct keys (python -m bench.memory)", flush=True)
    memory = subprocess.run([sys.executable, "-m", "bench.memory", "--keys", keys],
                            capture_output=True, text=True, cwd=REPO_ROOT).stdout
    print(memory)
    for label, (per_hit, _) in profile.items():
        print(f"profile {label}: {per_hit * 1e6:.0f} us per hit (in-process, cProfile off)")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    if not args.no_docs:
        write_report(doc, profile, memory, args)
        write_readme_table(doc)
    return 0


def _med(values: list[Wrk], attr: str) -> float:
    return float(statistics.median(getattr(v, attr) for v in values))


def summarise(runs: dict[str, list[Wrk]], high: dict[tuple[str, str], list[Wrk]],
              never: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    """The run's numbers: medians, ratios to stock raw (also per round), the 1,000 rows."""
    stock = runs[STOCK_RAW]
    raw, raw_cpu = _med(stock, "rps"), _med(stock, "cpu")
    rows = [{"key": row.key, "label": row.label, "server": row.server, "path": row.path,
             "rps": _med(runs[row.key], "rps"), "ratio": _med(runs[row.key], "rps") / raw,
             "cpu": _med(runs[row.key], "cpu"),
             # Requests per CPU second of the workers, against stock raw's: what the
             # server can serve, much steadier than req/s on a shared machine.
             "capacity": raw_cpu / _med(runs[row.key], "cpu"),
             "cpu_per_round": [w.cpu for w in runs[row.key]],
             "p99": _med(runs[row.key], "p99"),
             "p99_per_round": [w.p99 for w in runs[row.key]],
             # Each round's ratio to that round's stock raw run: how much of the spread
             # is the machine (shown next to the table; the targets use the medians).
             "per_round": [w.rps / s.rps for w, s in zip(runs[row.key], stock, strict=True)],
             "errors": sum(v.errors for v in runs[row.key])} for row in ROWS]
    high_rows = [{"server": n, "path": p, "rps": _med(h, "rps"), "p99": _med(h, "p99"),
                  "cpu": _med(h, "cpu"),
                  "p99_per_round": [v.p99 for v in h], "timeouts": int(_med(h, "timeouts")),
                  "errors": sum(v.errors for v in h), "never": never.get(n)}
                 for (n, p), h in high.items()]
    return {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": rows, "high": high_rows, "never": never}


#: The side-by-side ratio (:func:`costs`) each row of :data:`bench.pieces.SUMS` is measured by.
PIECES_MEASURED = {
    "raw app, our config": "raw app, our config / stock",
    "`/v1` hit": "`/v1` hit / stock raw",
    "`@swr.cached` hit": "`@swr.cached` hit / stock raw",
    "bare Flask view, our hooks": "bare Flask view, our hooks / stock",
}


def _ms(seconds: Sequence[float]) -> str:
    return ", ".join(f"{x * 1000:,.0f}" for x in seconds)


def costs(doc: dict[str, Any]) -> list[tuple[str, float, list[float], float, list[float]]]:
    """The pairs measured side by side, each as (what, req/s ratio, its per-round
    ratios, requests-per-CPU-second ratio, its per-round ratios): above 1, the first of
    the pair does better."""
    by = {r["key"]: r for r in doc["rows"]}

    def pair(a: str, b: str) -> tuple[float, list[float], float, list[float]]:
        per_round = [x / y for x, y in zip(by[a]["per_round"], by[b]["per_round"],
                                           strict=True)]
        cpu_per_round = [y / x for x, y in zip(by[a]["cpu_per_round"],
                                               by[b]["cpu_per_round"], strict=True)]
        return (by[a]["rps"] / by[b]["rps"], per_round, by[b]["cpu"] / by[a]["cpu"],
                cpu_per_round)

    return [(what, *pair(a, b)) for what, a, b in (
        ("raw app, our config / stock", "raw", STOCK_RAW),
        ("with the fair turn / without", "raw", "raw, no fair turn"),
        ("with our access log (to a file) / without", "raw", "raw, no access log"),
        ("bare Flask view, our hooks / stock", "flask", "flask stock"),
        ("bare Flask view, our hooks without an access log / stock",
         "flask, no access log", "flask stock"),
        ("our accept path / gunicorn's own", "raw", "raw, no acceptor"),
        ("our accept path / gunicorn's own with reuse_port", "raw", "raw, reuse_port"),
        ("`/v1` hit / stock raw", "v1", STOCK_RAW),
        ("`@swr.cached` hit / stock raw", "swr", STOCK_RAW),
        ("`/v1` hit / Flask-Caching hit", "v1", "fc"),
        ("`@swr.cached` hit / Flask-Caching hit", "swr", "fc"),
    )]


def targets(doc: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The targets, each as (target, what this run measured, met)."""
    ratio = {c[0]: c[1:] for c in costs(doc)}
    high = {(h["server"], h["path"]): h for h in doc["high"]}
    stock_h = high["stock", "/raw"]
    h = doc["herd"]

    def judged(what: str) -> tuple[float, str]:
        """The requests-per-CPU-second ratio (judged) and both ratios as text."""
        rps, rps_rounds, cpu, cpu_rounds = ratio[what]
        return cpu, (f"{cpu:.2f}x per CPU second ({', '.join(f'{x:.2f}' for x in cpu_rounds)}"
                     f"); req/s {rps:.2f}x ({', '.join(f'{x:.2f}' for x in rps_rounds)})")

    out: list[tuple[str, str, bool]] = []
    for label, what, limit in (
            ("raw WSGI app on our config >= 0.9x stock gunicorn",
             "raw app, our config / stock", 0.9),
            ("the fair turn costs <= 5%", "with the fair turn / without", 0.95),
            ("our access log costs <= 5%", "with our access log (to a file) / without", 0.95),
            ("our hooks cost <= 5% on an uncached Flask view (both without an access log)",
             "bare Flask view, our hooks without an access log / stock", 0.95),
            ("our hooks and access log cost <= 5% on an uncached Flask view",
             "bare Flask view, our hooks / stock", 0.95),
            ("`/v1/NAME` hit >= 0.9x stock raw", "`/v1` hit / stock raw", 0.9),
            ("`@swr.cached` hit >= 0.85x stock raw", "`@swr.cached` hit / stock raw", 0.85),
            ("`/v1/NAME` hit >= 2x Flask-Caching `@cached` hit",
             "`/v1` hit / Flask-Caching hit", 2.0),
            ("`@swr.cached` hit >= 2x Flask-Caching `@cached` hit",
             "`@swr.cached` hit / Flask-Caching hit", 2.0)):
        value, text = judged(what)
        out.append((label, text, value >= limit))
    for path in ("/raw", "/v1/const"):
        ours = high["shipped", path]
        out.append((f"{doc['args']['high']:,} connections: `{path}` p99 on our config no "
                    "worse than stock raw's, no timeouts",
                    f"{ours['p99'] * 1000:,.0f} ms ({_ms(ours['p99_per_round'])}) vs "
                    f"{stock_h['p99'] * 1000:,.0f} ms ({_ms(stock_h['p99_per_round'])}); "
                    f"timeouts {ours['timeouts']}",
                    ours["p99"] <= stock_h["p99"] and ours["timeouts"] == 0))
    out += [
        ("one origin fetch per key per window (herd; <= 1.25 counted as one)",
         f"{h['per_window']:.2f} per window", h["per_window"] <= 1.25),
        ("during refreshes no read slower than 2x the hot-read p99 (herd)",
         f"{h['slowest_during'] * 1000:,.0f} ms vs {h['hot_p99'] * 1000:,.1f} ms: "
         f"{h['ratio']:.1f}x (the raw WSGI app under the same load, its slowest read "
         f"against its p99: {h['control']['ratio']:.1f}x)", h["ratio"] <= 2.0),
    ]
    return out


def implied_ratios(doc: dict[str, Any]) -> list[tuple[str, float, float]]:
    """The ratios our own per-request work implies (``bench.pieces.implied``), against
    stock raw's and stock bare Flask's CPU per request in this run."""
    by = {r["key"]: r for r in doc["rows"]}
    return pieces.implied(pieces.medians(doc["pieces"]), by[STOCK_RAW]["cpu"],
                          by["flask stock"]["cpu"])


def print_report(doc: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print(f"{'':72}{'req/s':>9}{'x stock':>8}{'CPU us':>8}{'x stock':>8}{'p99 ms':>9}"
          f"{'errors':>7}")
    for row in doc["rows"]:
        print(f"{row['label']:72}{row['rps']:>9,.0f}{row['ratio']:>8.2f}"
              f"{row['cpu'] * 1e6:>8.0f}{row['capacity']:>8.2f}"
              f"{row['p99'] * 1000:>9.1f}{row['errors']:>7}")
    print("x stock raw per round: " + "; ".join(
        f"{r['key']} " + " ".join(f"{x:.2f}" for x in r["per_round"])
        for r in doc["rows"] if r["key"] != STOCK_RAW))
    print("\nside by side, requests per CPU second (per round) and req/s (per round):")
    for what, rps, rps_rounds, cpu, cpu_rounds in costs(doc):
        print(f"  {what:52} {cpu:.2f} ({', '.join(f'{x:.2f}' for x in cpu_rounds)})  "
              f"{rps:.2f} ({', '.join(f'{x:.2f}' for x in rps_rounds)})")
    print(f"\nat {args.high} connections, {args.high_seconds:g} s, wrk --timeout 5s:")
    for h in doc["high"]:
        print(f"  {h['server']:16} {h['path']:10}{h['rps']:>8,.0f} req/s  "
              f"{h['cpu'] * 1e6:,.0f} us CPU/req  "
              f"p99 {h['p99'] * 1000:,.0f} ms ({_ms(h['p99_per_round'])})  "
              f"timeouts {h['timeouts']}  errors {h['errors']}")
    print(f"{args.high} keep-alive connections asking once, no answer within 5 s: "
          + ", ".join(f"{n} {v}" for n, v in doc["never"].items()))
    cold, herded = doc["cold"], doc["herd"]
    print(f"\ncold key, {cold['readers']} simultaneous readers, 1 s origin: "
          f"{cold['fetches']:g} origin fetch(es), {cold['ok']} answered 200, "
          f"X-Cache {cold['x_cache']}, wait p50 {cold['p50']:.2f} s, slowest reader "
          f"{cold['max']:.2f} s")
    print(herd_line(herded))
    print("  control: " + noise.control_line(herded["control"]))
    print("  control: " + noise.stalls_line(herded["stalls"]))
    print("\nour pieces alone, in-process, µs per request (python -m bench.pieces):")
    for name, value in pieces.medians(doc["pieces"]).items():
        print(f"  {name:12} {value * 1e6:5.2f}")
    for row, added, ratio in implied_ratios(doc):
        print(f"  {row:30} +{added * 1e6:5.2f} µs: {ratio:.3f}x stock by our own work")
    print("\ntargets:")
    for target, value, ok in targets(doc):
        print(f"  {'MET    ' if ok else 'NOT MET'} {target}: {value}")


def readme_table(doc: dict[str, Any]) -> str:
    """The README's performance table, from this run."""
    by = {r["key"]: r for r in doc["rows"]}
    high = {(h["server"], h["path"]): h for h in doc["high"]}
    keys = [STOCK_RAW, "raw", "flask stock", "flask", "flask, no access log", "fc", "v1", "swr"]
    args = doc["args"]
    lines = [
        f"From the latest `make bench`: {args['workers']} gevent workers per server on a "
        f"shared {os.cpu_count()}-core machine, wrk at {args['connections']} keep-alive "
        f"connections, medians of {args['rounds']} interleaved rounds, as ratios of a raw "
        "WSGI app under stock `gunicorn -k gevent` measured in the same run "
        "([docs/BENCHMARKS.md](docs/BENCHMARKS.md) has every round and the rest):", "",
        "| answer | req/s | × stock raw | × stock raw per CPU second | p99 ms |",
        "|---|---:|---:|---:|---:|",
        *[f"| {by[k]['label']} | {by[k]['rps']:,.0f} | {by[k]['ratio']:.2f} | "
          f"{by[k]['capacity']:.2f} | {by[k]['p99'] * 1000:.1f} |" for k in keys], "",
        f"Per CPU second, `/v1` serves {by['fc']['cpu'] / by['v1']['cpu']:.1f}× and "
        f"`@swr.cached` {by['fc']['cpu'] / by['swr']['cpu']:.1f}× the requests of "
        "Flask-Caching's hit. "
        f"The fair turn keeps the p99 at {by['raw']['p99'] * 1000:.0f} ms on the raw app "
        f"(without it {by['raw, no fair turn']['p99'] * 1000:,.0f} ms). At "
        f"{args['high']:,} connections, p99 (timeouts): stock raw "
        f"{high['stock', '/raw']['p99'] * 1000:,.0f} ms "
        f"({high['stock', '/raw']['timeouts']}), our raw "
        f"{high['shipped', '/raw']['p99'] * 1000:,.0f} ms "
        f"({high['shipped', '/raw']['timeouts']}), `/v1` "
        f"{high['shipped', '/v1/const']['p99'] * 1000:,.0f} ms "
        f"({high['shipped', '/v1/const']['timeouts']}).",
    ]
    return "\n".join(lines)


def write_readme_table(doc: dict[str, Any]) -> None:
    """Rewrite the README's block between the two markers, and nothing else."""
    readme = REPO_ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = README_BLOCK
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        print(f"README.md has no {start} ... {end} block: its table is left as it is")
        return
    text = text[:i + len(start)] + "\n" + readme_table(doc) + "\n" + text[j:]
    readme.write_text(text, encoding="utf-8")
    print(f"rewrote the performance table in {readme}")


def write_report(doc: dict[str, Any], profile: dict[str, tuple[float, str]], memory: str,
                 args: argparse.Namespace) -> None:
    """docs/BENCHMARKS.md and its plot, from this run's numbers."""
    docs = REPO_ROOT / "docs"
    rows, high, cold, herded = doc["rows"], doc["high"], doc["cold"], doc["herd"]
    plot = "benchmarks.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
        left.barh([r["key"] for r in rows][::-1], [r["ratio"] for r in rows][::-1])
        left.axvline(1.0, color="grey", lw=0.8)
        left.set_xlabel(f"requests/s relative to stock gunicorn's raw WSGI app "
                        f"({args.connections} connections)")
        right.barh([f"{h['server']} {h['path']}" for h in high][::-1],
                   [h["p99"] * 1000 for h in high][::-1])
        right.set_xlabel(f"p99 ms at {args.high} connections")
        fig.tight_layout()
        fig.savefig(docs / plot, dpi=90)
        plt.close(fig)
        plotted = f"![hit throughput and 1,000-connection tail]({plot})\n"
    except ImportError:
        plotted = "(matplotlib is not installed: no plot this run)\n"
    variants = "; ".join(f"`{name}`: {what}" for name, (what, _) in VARIANTS.items())
    measured = {c[0]: c[3] for c in costs(doc)}   # per CPU second, by side-by-side pair
    lines = [
        "# Benchmarks", "",
        "Written by `make bench` (`python -m bench.throughput`); every number below comes "
        "from one run, on one machine, so the ratios hold even when the absolute numbers "
        "are noisy. The baseline is stock gunicorn: `gunicorn -k gevent` with every "
        "setting its default (no access log) serving `bench/plain_app.py` (a raw WSGI app "
        "answering constant bytes, a bare Flask view, Flask-Caching's `@cached` with its "
        "`MemcachedCache` as documented, python-memcached). Beside it, the shipped "
        "`deploy/gunicorn.conf.py` (Prometheus multiprocess mode, our access log to a "
        "file) serving `bench/hits_app.py`, and the shipped config with one thing taken "
        f"out (`bench/variants.py`; {variants}). {args.workers} gevent workers per server, "
        f"their own memcached, wrk with {args.connections} keep-alive connections, "
        f"{args.rounds} interleaved round(s) of {args.seconds:g} s per row (each round "
        f"starting one row later), medians. {os.cpu_count()} CPUs shared with the load "
        f"generator, memcached and whatever else runs; load average "
        f"{doc['load_average']:.2f} when it started; {doc['seconds'] / 60:.1f} minutes.",
        "",
        "Two measures of each row. Requests/s is what wrk saw; on a shared machine it "
        "swings between rounds by more than any difference measured here, so each row "
        "also has its workers' CPU time per request (every thread's, from "
        "`/proc/PID/task/*/schedstat`, over the same run), and `× stock` of it is stock "
        "raw's CPU per request divided by the row's: how many requests the same CPU "
        "serves. The targets are judged on that one, with req/s beside it.", "",
        "| answer | req/s | × stock raw | CPU µs/request | × stock raw (per CPU s) | "
        "p99 ms (per round) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['label']} | {r['rps']:,.0f} | {r['ratio']:.2f} | {r['cpu'] * 1e6:,.0f} | "
          f"{r['capacity']:.2f} | {r['p99'] * 1000:,.1f} "
          f"({_ms(r['p99_per_round'])}) | {r['errors']} |" for r in rows], "",
        "Each round against that round's stock raw run (the spread is the machine's): "
        + "; ".join(f"`{r['key']}` " + ", ".join(f"{x:.2f}" for x in r["per_round"])
                    for r in rows if r["key"] != STOCK_RAW) + ".", "",
        "Side by side, the two rows' medians (and each round's pair); above 1 the first "
        "does better:", "",
        "| ratio | per CPU second | per round | req/s | per round |",
        "|---|---:|---|---:|---|",
        *[f"| {what} | {cpu:.2f} | {', '.join(f'{x:.2f}' for x in cpu_rounds)} | "
          f"{rps:.2f} | {', '.join(f'{x:.2f}' for x in rps_rounds)} |"
          for what, rps, rps_rounds, cpu, cpu_rounds in costs(doc)], "",
        f"At {args.high} connections ({args.high_seconds:g} s, wrk `--timeout 5s`, two "
        "rounds, the second in the opposite order, medians), and how many of "
        f"{args.high} keep-alive connections opened at once, each asking once, got no "
        "answer within 5 s (wrk counts neither those nor their latency):", "",
        "| server | path | req/s | CPU µs/request | p99 ms (per round) | timeouts | errors "
        "| never answered |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *[f"| `{h['server']}` | `{h['path']}` | {h['rps']:,.0f} | {h['cpu'] * 1e6:,.0f} | "
          f"{h['p99'] * 1000:,.0f} "
          f"({_ms(h['p99_per_round'])}) | {h['timeouts']} | {h['errors']} | "
          f"{h['never'] if h['never'] is not None else ''} |" for h in high], "",
        f"A cold key read by {cold['readers']} simultaneous readers (origin 1 s): "
        f"{cold['fetches']:g} origin fetch(es), {cold['ok']} answers 200, X-Cache "
        f"{cold['x_cache']}, wait p50 {cold['p50']:.2f} s, slowest of the {cold['readers']} "
        f"readers {cold['max']:.2f} s.", "",
        "The " + herd_line(herded) + ".", "",
        "Its two controls, measured right after it (`bench/noise.py`): "
        + noise.control_line(herded["control"]) + "; and "
        + noise.stalls_line(herded["stalls"]) + ".", "",
        "## The targets, judged on this run", "",
        "| target | this run | met |", "|---|---|---|",
        *[f"| {t} | {v} | {'yes' if ok else '**no**'} |" for t, v, ok in targets(doc)], "",
        "## What our own work adds, piece by piece", "",
        "wrk's rounds move by 10% and more between two runs of the same server on this "
        "host, more than most of what our config adds to a request. So each piece of "
        "ours is also timed alone, in-process, in a gevent-patched process "
        f"(`bench/pieces.py`, {len(next(iter(doc['pieces'].values())))} interleaved "
        "rounds, the best of three runs in each, medians), and added up against stock's "
        "CPU per request measured above: the ratio each row would have if only our "
        "per-request work counted. What a measured ratio falls short of it is the "
        "host's noise and what serving connections in turns does to the CPU's caches "
        "(the raw rows with and without the fair turn above).", "",
        "| piece | µs per request | rounds |", "|---|---:|---|",
        *[f"| {name} | {value * 1e6:.2f} | "
          f"{', '.join(f'{v * 1e6:.2f}' for v in doc['pieces'][name])} |"
          for name, value in pieces.medians(doc["pieces"]).items()], "",
        "| row | pieces | our µs added | × stock by our own work | measured × stock "
        "(per CPU second) |", "|---|---|---:|---:|---:|",
        *[f"| {row} | {' + '.join(pieces.SUMS[row])} | {added * 1e6:.1f} | {ratio:.3f} | "
          f"{measured[PIECES_MEASURED[row]]:.2f} |" for row, added, ratio in implied_ratios(doc)],
        "",
        plotted,
        "The herd bench comparing `@swr.cached` with plain `@cached` (4 workers) is "
        "`python -m bench`, run by `make bench` right after this one; see `bench/README.md`.",
        "",
        "## Memory", "", "```", memory.strip(), "```", "",
        "## Where a hot hit's time goes", "",
        "In-process (no gunicorn, no network), `bench/profile_hit.py`: the same fresh "
        "`/v1` hit answered through Flask's dispatch (the fast path off) and through the "
        "fast path. Top functions by own time under cProfile.", "",
    ]
    findings = REPO_ROOT / "bench" / "findings.md"
    if findings.exists():
        lines += [findings.read_text(encoding="utf-8").strip(), ""]
    for label, (per_hit, table) in profile.items():
        lines += [f"### {label}: {per_hit * 1e6:.0f} µs per hit", "", "```", table, "```", ""]
    (docs / "BENCHMARKS.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {docs / 'BENCHMARKS.md'} and {docs / plot}")


if __name__ == "__main__":
    sys.exit(main())
